"""Invariant 2: recipes replay. save → restore gives identical outputs; bad recipes/bases are clear errors."""
from __future__ import annotations

import json

import pytest
import torch

import surgeon
from surgeon.passes import FinalizeReLU, LinearizeReLU, masked_units

from surgeon_test_models import TinyResNet, randomize_bn


def _trained(resnet, images):
    """LinearizeReLU (pixel) + random mask values + finalize: a surgery with non-default state."""
    s = surgeon.apply(resnet, LinearizeReLU(granularity="pixel", targets=r"(layer1|head)\..*"),
                      example_inputs=(images,))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in s.model.named_parameters():
            if name.endswith("mask"):
                p.copy_(torch.rand(p.shape, generator=g))
        masked_units(s.model)["head.relu@2"].mask.zero_()
    return s


def test_save_restore_identical_outputs(resnet, images, tmp_path):
    s = _trained(resnet, images)
    x = torch.randn(3, 3, 12, 12)
    surgeon.save(s, tmp_path / "masked")
    restored = surgeon.restore(TinyResNet(), tmp_path / "masked")  # fresh base: weights come from the file
    assert torch.equal(restored.eval()(x), s.model(x))

    f = surgeon.apply(s, FinalizeReLU())
    surgeon.save(f, tmp_path / "final")
    fresh = randomize_bn(TinyResNet(), seed=9).eval()
    restored = surgeon.restore(fresh, tmp_path / "final").eval()
    assert torch.equal(restored(x), f.model(x))
    assert restored.code == f.model.code
    recipe = json.loads((tmp_path / "final" / "recipe.json").read_text())
    assert [p["pass"] for p in recipe["passes"]] == ["LinearizeReLU", "FinalizeReLU"]
    assert recipe["example_inputs"] == [{"shape": [2, 3, 12, 12], "dtype": "float32"}]
    actions = {site["name"]: site["data"]["action"] for site in recipe["passes"][1]["sites"]}
    assert actions["head.relu@2"] == "identity"
    assert json.loads((tmp_path / "final" / "report.json").read_text())["title"] == "surgery"


def test_restore_onto_wrong_base_names_first_mismatch(resnet, images, tmp_path):
    surgeon.save(_trained(resnet, images), tmp_path)
    with pytest.raises(surgeon.RestoreError, match=r"'stem.0.weight' has shape \[16, 3, 3, 3\], the recipe expects \[8, 3, 3, 3\]"):
        surgeon.restore(TinyResNet(c=16), tmp_path)
    with pytest.raises(surgeon.RestoreError, match="model class is 'Linear'"):
        surgeon.restore(torch.nn.Linear(2, 2), tmp_path)
    with pytest.raises(surgeon.RestoreError, match="'head.fc2.weight' has shape"):
        surgeon.restore(TinyResNet(classes=7), tmp_path)


def test_corrupted_and_hand_edited_recipes(resnet, images, tmp_path):
    surgeon.save(_trained(resnet, images), tmp_path)
    path = tmp_path / "recipe.json"
    good = path.read_text()

    path.write_text(good[: len(good) // 2])
    with pytest.raises(surgeon.RecipeError, match=r"recipe.json is not valid JSON \(line \d+"):
        surgeon.restore(TinyResNet(), tmp_path)

    edited = json.loads(good)
    edited["passes"][0]["config"]["granularity"] = "layer"
    path.write_text(json.dumps(edited, indent=2))
    with pytest.raises(surgeon.RecipeError, match="was changed after it was saved"):
        surgeon.restore(TinyResNet(), tmp_path)

    # without the weights' digest to compare with, the content itself is validated
    (tmp_path / "model.safetensors").unlink()
    for mutate, match in [
        (lambda d: d["passes"][0].update({"pass": "LinearizeGELU"}), "unknown pass 'LinearizeGELU'; registered passes are"),
        (lambda d: d["passes"][0]["config"].update({"granularity": "row"}), "invalid config.*'row' is not one of"),
        (lambda d: d["passes"][0]["config"].update({"colour": 1}), r"unknown field\(s\) \['colour'\]"),
        (lambda d: d.update({"format": "other/9"}), "unsupported recipe format"),
        (lambda d: d["passes"][0].pop("sites"), "must have keys 'pass', 'config', 'sites'"),
        (lambda d: d["passes"][0]["sites"][0].update({"name": "layer7.relu"}), "recorded site 'layer7.relu' does not exist"),
    ]:
        d = json.loads(good)
        mutate(d)
        path.write_text(json.dumps(d))
        with pytest.raises(surgeon.RecipeError, match=match):
            surgeon.restore(TinyResNet(), tmp_path)


def test_restore_leaves_base_model_untouched(resnet, images, tmp_path):
    surgeon.save(_trained(resnet, images), tmp_path)
    base = TinyResNet()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    surgeon.restore(base, tmp_path)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
