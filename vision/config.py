"""VisionConfig: the fields of a Qwen3.5 `vision_config` (and the image processor's) that change the math."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584  # the text model's hidden size
    num_position_embeddings: int = 2304  # a square grid of learned positions, resampled per image
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0
    # the image processor (preprocessor_config.json): pixels per image after resizing, normalisation
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"vision hidden_size {self.hidden_size} / num_heads {self.num_heads} must be a "
                             f"multiple of 4 (axial rotary over height and width)")
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"vision hidden_act {self.hidden_act!r} is not supported")
        if int(self.num_position_embeddings**0.5) ** 2 != self.num_position_embeddings:
            raise ValueError(f"num_position_embeddings {self.num_position_embeddings} is not a square")

    @property
    def factor(self) -> int:
        """Image sides are resized to multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.spatial_merge_size

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    def flops_per_patch(self) -> int:
        """Multiply-adds of the tower per patch (linear layers; attention's quadratic part left out)."""
        D, I, M = self.hidden_size, self.intermediate_size, self.spatial_merge_size**2
        block = 4 * D * D + 2 * D * I
        return self.patch_dim * D + self.depth * block + ((M * D) ** 2 + M * D * self.out_hidden_size) // M

    @classmethod
    def from_dict(cls, raw: dict[str, Any], processor: dict[str, Any] | None = None) -> VisionConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known and not isinstance(v, (list, dict))}
        if "depth" not in values and "num_hidden_layers" in raw:
            values["depth"] = raw["num_hidden_layers"]
        if "num_heads" not in values and "num_attention_heads" in raw:
            values["num_heads"] = raw["num_attention_heads"]
        for key in ("patch_size", "temporal_patch_size"):
            if isinstance(raw.get(key), (list, tuple)):
                values[key] = int(raw[key][0])
        rope = raw.get("rope_parameters") or {}
        if "rope_theta" in rope:
            values["rope_theta"] = float(rope["rope_theta"])
        processor = processor or {}
        size = processor.get("size") or {}
        for key, name in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            value = processor.get(key, size.get(name))
            if value is not None:
                values[key] = int(value)
        for key in ("image_mean", "image_std"):
            if processor.get(key) is not None:
                values[key] = tuple(float(x) for x in processor[key])
        config = cls(**values)
        for key, ours in (("patch_size", config.patch_size), ("temporal_patch_size", config.temporal_patch_size),
                          ("merge_size", config.spatial_merge_size)):
            if processor.get(key, ours) != ours:
                raise ValueError(f"preprocessor_config.json {key} = {processor[key]} disagrees with the "
                                 f"vision_config's {ours}")
        return config
