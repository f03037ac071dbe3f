"""Qwen3.5's vision input (pure torch, numpy and Pillow; no Ray): the vision tower (`model.visual.*`),
image decoding and preprocessing as Qwen's processor does it, and the multimodal rotary positions."""

from .config import VisionConfig
from .positions import image_spans, mrope_axes, mrope_positions, rotary_positions
from .preprocess import ImageError, ImageLimits, PreparedImage, decode_image, load_image, patchify, prepare_image
from .tower import VisionTower

__all__ = [
    "ImageError", "ImageLimits", "PreparedImage", "VisionConfig", "VisionTower", "decode_image", "image_spans",
    "load_image",
    "mrope_axes", "mrope_positions", "patchify", "prepare_image", "rotary_positions",
]
