"""Real photos for ImageNet models, offline: scikit-image's sample images, preprocessed as for evaluation.

Preprocessing (``imagenet_batch``): scale to [0, 1], resize the shorter side to ``size * 256 / 224``
(bilinear, antialiased, ``F.interpolate``), center-crop ``size x size``, then normalise. The default,
``normalize="tf"``, maps pixels to [-1, 1] (mean 0.5, std 0.5), the normalisation the TensorFlow
EfficientNet-Lite models were trained with; ``normalize="imagenet"`` uses the torchvision ImageNet
mean/std. Both classify ``chelsea`` and ``coffee`` correctly with EfficientNet-Lite0; [-1, 1] puts as much
probability on the cat classes (0.911 vs 0.914 in total) and more on espresso (0.911 vs 0.861).

>>> from surgeon.models import imagenet_batch
>>> imagenet_batch(["chelsea", "coffee"]).shape
torch.Size([2, 3, 224, 224])
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_IMAGES = ("chelsea", "coffee", "rocket", "astronaut", "motorcycle_left", "motorcycle_right", "hubble_deep_field",
                 "immunohistochemistry", "retina")   # every RGB photo scikit-image ships (no download)
# ImageNet class ids a correct classifier puts first: Egyptian/tabby/tiger cat, and espresso
IMAGENET_EXPECTED = {"chelsea": {281, 282, 285}, "coffee": {967}}
_NORMS = {"tf": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
          "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def sample_image(name: str) -> np.ndarray:
    """A scikit-image sample photo as a ``uint8`` array of shape (H, W, 3).

    >>> sample_image("coffee").shape
    (400, 600, 3)
    """
    if name not in SAMPLE_IMAGES:
        raise ValueError(f"unknown sample image {name!r}; valid names: {', '.join(SAMPLE_IMAGES)}")
    try:
        import skimage.data
    except ImportError as e:
        raise ImportError("sample images need scikit-image: `pip install scikit-image`") from e
    if name.startswith("motorcycle_"):                      # a stereo pair: (left, right, disparity)
        image = np.asarray(skimage.data.stereo_motorcycle()[0 if name.endswith("left") else 1])
    else:
        image = np.asarray(getattr(skimage.data, name)())
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, image.shape
    return image


def imagenet_batch(names: Sequence[str] = ("chelsea", "coffee"), size: int = 224,
                   normalize: str = "tf") -> torch.Tensor:
    """Float32 batch (N, 3, size, size) of sample images, preprocessed for ImageNet evaluation.

    ``normalize`` is ``"tf"`` (pixels in [-1, 1]) or ``"imagenet"`` (torchvision mean/std).

    >>> imagenet_batch(["rocket"], size=128, normalize="imagenet").shape
    torch.Size([1, 3, 128, 128])
    """
    if normalize not in _NORMS:
        raise ValueError(f"unknown normalize {normalize!r}; valid: {', '.join(_NORMS)}")
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in _NORMS[normalize])
    short = round(size * 256 / 224)
    crops = []
    for name in names:
        x = torch.from_numpy(sample_image(name)).permute(2, 0, 1).float().div_(255)
        h, w = x.shape[1:]
        scale = short / min(h, w)
        hs, ws = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x[None], size=(hs, ws), mode="bilinear", antialias=True, align_corners=False)[0]
        top, left = (hs - size) // 2, (ws - size) // 2
        crops.append((x[:, top:top + size, left:left + size] - mean) / std)
    return torch.stack(crops)


def held_out_views(names: Sequence[str] = ("chelsea", "coffee"), size: int = 224, shorts: Sequence[int] = (288, 320),
                   normalize: str = "tf") -> tuple[torch.Tensor, list[str]]:
    """Views of the photos that :func:`imagenet_batch` (center crop) and its horizontal flip never show.

    For each image and each shorter-side size in ``shorts``: the four corner crops and their
    horizontal flips (8 views per size), preprocessed as :func:`imagenet_batch`. Returns the batch
    and a label per view (``"chelsea/288/top-left/flip"``).

    >>> views, labels = held_out_views(["coffee"], shorts=(256,))
    >>> views.shape, labels[0], labels[-1]
    (torch.Size([8, 3, 224, 224]), 'coffee/256/top-left', 'coffee/256/bottom-right/flip')
    """
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in _NORMS[normalize])
    out, labels = [], []
    for name in names:
        x = torch.from_numpy(sample_image(name)).permute(2, 0, 1).float().div_(255)
        h, w = x.shape[1:]
        for short in shorts:
            scale = short / min(h, w)
            hs, ws = max(size, round(h * scale)), max(size, round(w * scale))
            r = F.interpolate(x[None], size=(hs, ws), mode="bilinear", antialias=True, align_corners=False)[0]
            corners = {"top-left": (0, 0), "top-right": (0, ws - size), "bottom-left": (hs - size, 0),
                       "bottom-right": (hs - size, ws - size)}
            for flip in (False, True):
                for corner, (top, left) in corners.items():
                    crop = (r[:, top:top + size, left:left + size] - mean) / std
                    out.append(crop.flip(-1) if flip else crop)
                    labels.append(f"{name}/{short}/{corner}" + ("/flip" if flip else ""))
    return torch.stack(out), labels
