"""Real models and images available offline (EfficientNet-Lite0, scikit-image sample photos)."""
from surgeon.models.efficientnet_lite import EfficientNetLite0, efficientnet_lite0, efficientnet_lite0_weights_path
from surgeon.models.images import IMAGENET_EXPECTED, SAMPLE_IMAGES, held_out_views, imagenet_batch, sample_image

__all__ = [
    "EfficientNetLite0", "efficientnet_lite0", "efficientnet_lite0_weights_path",
    "IMAGENET_EXPECTED", "SAMPLE_IMAGES", "held_out_views", "imagenet_batch", "sample_image",
]
