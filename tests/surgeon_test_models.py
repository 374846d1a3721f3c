"""Small real models covering every ReLU spelling the passes must handle (a uniquely named module:
the CLI tests load ``surgeon_test_models:seeded_resnet`` by name, which a ``conftest`` could shadow)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """torchvision-style residual block: one ``self.relu`` module object called at two call sites."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class Head(nn.Module):
    """Nested custom module with functional spellings: F.relu6, torch.relu, clamp, .relu_()."""

    def __init__(self, c: int, classes: int) -> None:
        super().__init__()
        self.mix = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU6())
        self.fc1 = nn.Linear(c, 2 * c)
        self.fc2 = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.mix(x) - 1.0)
        x = torch.clamp(x, min=0) + torch.relu(x - 0.5)
        x = x.mean(dim=(2, 3))
        return self.fc2(self.fc1(x).relu_())


class TinyResNet(nn.Module):
    """A residual CNN with 9 ReLU-family call sites of every spelling (all traceable)."""

    def __init__(self, c: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.layer1 = nn.Sequential(Block(c), Block(c))
        self.head = Head(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(self.layer1(x), inplace=True)
        return self.head(x)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics so eval-mode outputs are not degenerate."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def seeded_resnet(seed: int = 0) -> TinyResNet:
    """A deterministic TinyResNet (also the CLI's ``--model surgeon_test_models:seeded_resnet`` factory)."""
    torch.manual_seed(seed)
    return randomize_bn(TinyResNet(), seed).eval()


def other_resnet() -> TinyResNet:
    """Same architecture, different weights: the wrong model for a verification."""
    return seeded_resnet(seed=1)


def byte_tokenizer() -> "transformers.PreTrainedTokenizerFast":
    """A byte-level tokenizer built in code (259 ids: <pad> <s> </s> + 256 bytes): any text, no download."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", *bytes_to_unicode().values()])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")
