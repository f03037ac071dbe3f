"""Image preprocessing as Qwen's image processor does it, with Pillow and numpy: decode, convert to
RGB, resize (bicubic) so that both sides are multiples of patch x merge and the pixel count is within
[min_pixels, max_pixels], rescale to [0, 1], normalise, and cut into patches in spatial-merge-block
order with the single frame repeated over the temporal patch.

The front door decodes and resizes (`prepare_image`: its limits refuse bad input early, and a resized
uint8 image is what travels); the attention worker normalises and cuts (`patchify`).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .config import VisionConfig


class ImageError(ValueError):
    """An image that cannot be served; the message names the problem (and the limit, if one)."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 2**20  # encoded size
    max_pixels: int = 40_000_000  # decoded width x height (before resizing): decompression bombs


@dataclass(frozen=True)
class PreparedImage:
    """A decoded, resized image: pixels [H, W, 3] uint8 with H, W multiples of patch x merge."""

    pixels: np.ndarray
    grid: tuple[int, int, int]  # (frames, patch rows, patch columns)

    def num_tokens(self, merge: int) -> int:
        t, h, w = self.grid
        return t * h * w // merge**2

    def num_patches(self) -> int:
        t, h, w = self.grid
        return t * h * w


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen's target size: sides multiples of factor, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"image aspect ratio {max(height, width) / min(height, width):.0f} is above 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Encoded image bytes (PNG, JPEG, ...) -> a loaded PIL image, or ImageError naming the problem."""
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data)} bytes; the limit is {limits.max_bytes} (max_image_bytes)")
    if not data:
        raise ImageError("image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > limits.max_pixels:  # checked before the pixels are decoded
            raise ImageError(f"image is {width}x{height} = {width * height} pixels; the limit is "
                             f"{limits.max_pixels} (max_image_pixels)")
        image.load()
    except ImageError:
        raise
    except UnidentifiedImageError as e:  # its message names a Python object, not the problem
        raise ImageError("image cannot be decoded: not an image format Pillow reads, or a corrupt "
                         "header (zero width or height, for one)") from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"image cannot be decoded: {e}") from e
    return image


def prepare_image(image: Image.Image, cfg: VisionConfig) -> PreparedImage:
    """RGB, resized as Qwen's processor does (bicubic): the uint8 pixels and their patch grid."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"image has zero size ({width}x{height})")
    h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    rgb = image.convert("RGB")
    if (w, h) != (width, height):
        rgb = rgb.resize((w, h), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(rgb, dtype=np.uint8)
    return PreparedImage(pixels, (1, h // cfg.patch_size, w // cfg.patch_size))


def load_image(source, cfg: VisionConfig, limits: ImageLimits = ImageLimits()) -> PreparedImage:
    """A PreparedImage from what a Python caller may hold: a PIL image, encoded bytes, a file path,
    or an already prepared image."""
    if isinstance(source, PreparedImage):
        return source
    if isinstance(source, Image.Image):
        return prepare_image(source, cfg)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return prepare_image(decode_image(bytes(source), limits), cfg)
    if isinstance(source, str) or hasattr(source, "__fspath__"):
        with open(source, "rb") as f:
            return prepare_image(decode_image(f.read(), limits), cfg)
    raise ImageError(f"an image must be a PIL image, encoded bytes or a file path, got {type(source).__name__}")


def patchify(pixels_HWC: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """uint8 pixels [H, W, 3] -> normalised patches [h * w, C * t_patch * patch^2] (fp32) in
    spatial-merge-block order; the one frame fills the temporal patch."""
    H, W, C = pixels_HWC.shape
    p, m, tp = cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32)
    std = torch.tensor(cfg.image_std, dtype=torch.float32)
    image = ((pixels_HWC.float() * (1 / 255) - mean) / std).permute(2, 0, 1)  # [C, H, W]
    gh, gw = H // p, W // p
    patches = image.reshape(C, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # blocks, C, p, p
    patches = patches[:, :, :, :, :, None].expand(*patches.shape[:5], tp, p, p)
    return patches.reshape(gh * gw, C * tp * p * p)
