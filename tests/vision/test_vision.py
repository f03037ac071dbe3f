"""The vision leaf against transformers: Qwen's image processor, the vision tower, M-RoPE positions;
and bad images refused with the problem named."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from cluster.config import ModelConfig
from cluster.model.checkpoint import CheckpointReader
from cluster.model.loading import load_dense_model
from cluster.model.tiny import TinySpec
from tests.reference import hf_image_processor, hf_vl_inputs, hf_vl_model
from vision import (
    ImageError, ImageLimits, VisionConfig, decode_image, image_spans, mrope_positions, patchify, prepare_image,
)

SPEC = TinySpec(seed=21, num_experts=8, top_k=2, multimodal=True)


def random_image(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def zero_width_png() -> bytes:
    """A PNG whose header says 0 x 4 pixels (with a valid checksum)."""
    data = bytearray(png(Image.new("RGB", (4, 4))))
    header = bytearray(data[16:29])  # the IHDR chunk's data: width, height, ...
    header[0:4] = struct.pack(">I", 0)
    data[16:29], data[29:33] = header, struct.pack(">I", zlib.crc32(b"IHDR" + bytes(header)))
    return bytes(data)


@pytest.fixture(scope="module")
def model_dir(make_checkpoint):
    return make_checkpoint(SPEC)


def test_preprocessing_matches_qwens_image_processor(model_dir):
    vision = ModelConfig.from_pretrained(model_dir).vision
    # sizes: resized up to min_pixels, odd sides rounded, a grey and an RGBA image, one scaled down
    images = [random_image(20, 30, 1), random_image(70, 100, 2, "L"), random_image(130, 64, 3, "RGBA"),
              random_image(1500, 900, 4)]
    ref = hf_image_processor(vision)(images, return_tensors="pt")
    prepared = [prepare_image(image, vision) for image in images]
    assert [list(p.grid) for p in prepared] == ref["image_grid_thw"].tolist()
    ours = torch.cat([patchify(torch.from_numpy(p.pixels.copy()), vision) for p in prepared])
    torch.testing.assert_close(ours, ref["pixel_values"], atol=1e-6, rtol=0)


def test_vision_tower_matches_transformers(model_dir):
    cfg = ModelConfig.from_pretrained(model_dir)
    model = load_dense_model(cfg, CheckpointReader(model_dir), torch.float32)
    images = [random_image(70, 100, 5), random_image(130, 64, 6), random_image(48, 48, 7)]
    ref = hf_image_processor(cfg.vision)(images, return_tensors="pt")
    with torch.no_grad():
        visual = hf_vl_model(model_dir).model.visual
        expected = visual(ref["pixel_values"], grid_thw=ref["image_grid_thw"]).pooler_output
    ours = model.visual(ref["pixel_values"], [tuple(g) for g in ref["image_grid_thw"].tolist()])
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_mrope_positions_match_get_rope_index(model_dir):
    cfg = ModelConfig.from_pretrained(model_dir)
    pad, start, end = cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
    ids = [5, 6, start, pad, end, 7, start, pad, end, 8, 9]
    images = [random_image(70, 100, 8), random_image(130, 64, 9)]
    inputs = hf_vl_inputs(model_dir, ids, images)
    expected, delta = hf_vl_model(model_dir).model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"])
    expanded = inputs["input_ids"][0].tolist()
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    starts = image_spans(expanded, pad, grids, 2)
    positions, ours_delta = mrope_positions(len(expanded), list(zip(starts, grids)), 2)
    assert torch.equal(positions, expected[:, 0]) and ours_delta == int(delta)


def test_bad_images_are_refused_with_the_problem_named():
    good = png(random_image(40, 40))
    with pytest.raises(ImageError, match="cannot be decoded"):
        decode_image(good[: len(good) // 2])  # truncated PNG
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"")
    with pytest.raises(ImageError, match="zero width or height"):
        decode_image(zero_width_png())
    with pytest.raises(ImageError, match="cannot be decoded"):
        decode_image(b"not an image at all")
    with pytest.raises(ImageError, match="max_image_pixels"):
        decode_image(png(random_image(300, 300)), ImageLimits(max_pixels=200 * 200))
    with pytest.raises(ImageError, match="max_image_bytes"):
        decode_image(good, ImageLimits(max_bytes=100))
    vision = VisionConfig(depth=1, hidden_size=32, num_heads=2, out_hidden_size=128, min_pixels=1024)
    with pytest.raises(ImageError, match="zero size"):
        prepare_image(Image.new("RGB", (0, 5)), vision)  # (a decoder never yields one; a caller may)
    with pytest.raises(ImageError, match="aspect ratio"):
        prepare_image(Image.new("RGB", (1000, 2)), vision)
