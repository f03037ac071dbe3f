"""Images at the front door: OpenAI `image_url` parts (data URLs; http(s) only when the server allows
fetching, from the hosts it names) and gRPC image bytes, decoded and resized here under the server's
limits, so that a bad or oversized image is refused with 400 / INVALID_ARGUMENT naming the problem
before it reaches a model instance. What travels on is the resized uint8 image
(vision.PreparedImage). Fetching and decoding block: callers on an event loop run them in a thread
(`prepare_urls`), so a slow image server stalls only its own request."""

from __future__ import annotations

import base64
import binascii
import urllib.parse
import urllib.request

from cluster.engine.multimodal import place_images
from vision import ImageError, ImageLimits, PreparedImage, decode_image, prepare_image

from .errors import RequestError

FETCH_TIMEOUT_S = 10


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to an http(s) URL the server would fetch itself."""

    def __init__(self, check) -> None:
        self.check = check

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.check(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class ImageInputs:
    def __init__(self, model_config, max_images: int, max_bytes: int, max_pixels: int, allow_urls: bool,
                 url_hosts: list[str] = ()) -> None:
        self.model_config = model_config
        self.url_hosts = {h.lower() for h in url_hosts}  # empty: any host (where URLs are allowed)
        self.max_images, self.allow_urls = max_images, allow_urls or bool(self.url_hosts)
        self.limits = ImageLimits(max_bytes=max_bytes, max_pixels=max_pixels)
        self._opener = urllib.request.build_opener(_CheckedRedirects(self._check_fetchable))

    def _check_fetchable(self, url: str) -> None:
        """Refuses an http(s) URL this server may not fetch (fetching off, or a host not named)."""
        if not self.allow_urls:
            raise RequestError("invalid", "image URLs are not fetched by this server (start it with "
                                          "--allow-image-urls); send a data URL", "image_url")
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise RequestError("invalid", f"image URL {url!r} is not an http(s) URL", "image_url")
        if self.url_hosts and parsed.hostname.lower() not in self.url_hosts:
            raise RequestError("invalid", f"image URL host {parsed.hostname!r} is not one this server fetches "
                                          f"from (image_url_hosts)", "image_url")

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
            self._check_fetchable(url)
            try:
                with self._opener.open(url, timeout=FETCH_TIMEOUT_S) as response:
                    data = response.read(self.limits.max_bytes + 1)
            except OSError as e:  # URLError and HTTPError included
                raise RequestError("invalid", f"image URL could not be fetched: {e}", "image_url") from e
            if len(data) > self.limits.max_bytes:
                raise RequestError("invalid", f"image at the URL is above {self.limits.max_bytes} bytes "
                                              f"(max_image_bytes)", "image_url")
            return data
        raise RequestError("invalid", "image_url must be a data URL (or http(s) where allowed)", "image_url")

    def prepare_urls(self, urls: list[str]) -> list[PreparedImage]:
        """image_url parts fetched or decoded, then prepared (blocking: run it off the event loop)."""
        return self.prepare([self.url_bytes(url) for url in urls])

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
