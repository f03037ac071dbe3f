"""Images at the front door: OpenAI `image_url` parts (data URLs; http(s) only when the server allows
fetching) and gRPC image bytes, decoded and resized here under the server's limits, so that a bad
or oversized image is refused with 400 / INVALID_ARGUMENT naming the problem before it reaches a
model instance. What travels on is the resized uint8 image (vision.PreparedImage)."""

from __future__ import annotations

import base64
import binascii
import urllib.request

from cluster.engine.multimodal import place_images
from vision import ImageError, ImageLimits, PreparedImage, decode_image, prepare_image

from .errors import RequestError

FETCH_TIMEOUT_S = 10


class ImageInputs:
    def __init__(self, model_config, max_images: int, max_bytes: int, max_pixels: int, allow_urls: bool) -> None:
        self.model_config = model_config
        self.max_images, self.allow_urls = max_images, allow_urls
        self.limits = ImageLimits(max_bytes=max_bytes, max_pixels=max_pixels)

    def url_bytes(self, url: str) -> bytes:
        """An image_url's bytes: a base64 data URL, or (if allowed) an http(s) URL fetched with a
        timeout and the byte limit."""
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if not header.endswith(";base64"):
                raise RequestError("invalid", "image data URLs must be base64 (data:image/png;base64,...)", "image_url")
            if len(payload) > self.limits.max_bytes * 4 // 3 + 4:
                raise RequestError("invalid", f"image is above {self.limits.max_bytes} bytes (max_image_bytes)",
                                   "image_url")
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as e:
                raise RequestError("invalid", f"image data URL is not valid base64: {e}", "image_url") from e
        if url.startswith(("http://", "https://")):
            if not self.allow_urls:
                raise RequestError("invalid", "image URLs are not fetched by this server (start it with "
                                              "--allow-image-urls); send a data URL", "image_url")
            try:
                with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
                    return response.read(self.limits.max_bytes + 1)
            except OSError as e:
                raise RequestError("invalid", f"image URL could not be fetched: {e}", "image_url") from e
        raise RequestError("invalid", "image_url must be a data URL (or http(s) where allowed)", "image_url")

    def check_count(self, count: int, param: str = "images") -> None:
        """A request may carry images only to a model with a vision tower, at most max_images."""
        if count and self.model_config.vision is None:
            raise RequestError("invalid", "this model takes no images (its checkpoint has no vision tower)", param)
        if count > self.max_images:
            raise RequestError("invalid", f"{count} images; this server takes at most {self.max_images} "
                                          f"per request (max_images_per_request)", param)

    def prepare(self, encoded: list[bytes | PreparedImage]) -> list[PreparedImage]:
        """Encoded images decoded and resized (ones already prepared pass through)."""
        self.check_count(len(encoded))
        try:
            return [data if isinstance(data, PreparedImage) else
                    prepare_image(decode_image(data, self.limits), self.model_config.vision) for data in encoded]
        except ImageError as e:
            raise RequestError("invalid", str(e), "images") from e

    def place(self, ids: list[int], images: list[PreparedImage]) -> list[int]:
        """The prompt's ids with each image's tokens in place (cluster.engine.multimodal.place_images)."""
        try:
            return place_images(ids, images, self.model_config)[0]
        except ValueError as e:
            raise RequestError("invalid", str(e), "images") from e
