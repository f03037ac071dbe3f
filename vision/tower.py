"""Qwen3.5's vision tower (checkpoint names `model.visual.*`), pure torch.

Patches (already cut and normalised by vision.preprocess) -> patch embedding (a Conv3d with stride =
kernel, i.e. one matmul) + the learned position grid resampled bilinearly to each image's grid ->
`depth` pre-norm ViT blocks (LayerNorm, attention within each image with 2D axial rotary over
(row, column), GELU-tanh MLP) -> the patch merger (LayerNorm, then each 2x2 block of patches
concatenated and projected to the text model's hidden size): one embedding per image token.

Patches arrive in spatial-merge-block order (the 2x2 patches of one image token consecutive), as
the reference's processor emits them. Shapes: P patches, D vision hidden, M = merge^2, E text hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig

Grid = tuple[int, int, int]  # (frames t, patch rows h, patch columns w)


def patch_rows_cols(grids: list[Grid], merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's (row, column) in its image's patch grid, in merge-block order: [P] each."""
    rows, cols = [], []
    for t, h, w in grids:
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        rows.append(r.reshape(shape).transpose(1, 2).flatten().repeat(t))
        cols.append(c.reshape(shape).transpose(1, 2).flatten().repeat(t))
    return torch.cat(rows), torch.cat(cols)


def _bilinear_taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """align_corners bilinear resampling of a `side`-long axis onto `size` points: 2 taps and weights."""
    src = index.float() * (side - 1) / torch.clamp(size - 1, min=1).float()
    floor = torch.floor(src)
    taps = (floor.long()[:, None] + torch.arange(2)).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - torch.arange(2)).abs()).clamp(min=0)
    return taps, weights


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.norm1 = nn.LayerNorm(D, eps=1e-6)
        self.norm2 = nn.LayerNorm(D, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(D, 3 * D)
        self.attn.proj = nn.Linear(D, D)
        self.mlp = nn.Module()
        self.mlp.linear_fc1 = nn.Linear(D, cfg.intermediate_size)
        self.mlp.linear_fc2 = nn.Linear(cfg.intermediate_size, D)
        self.approximate = "tanh" if cfg.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x_PD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        P, D = x_PD.shape
        q, k, v = self.attn.qkv(self.norm1(x_PD)).view(P, 3, self.num_heads, -1).unbind(1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        # attention within each frame of each image: a few large images per step, so a loop of
        # dense SDPA calls beats one masked call over all of them
        out = [F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1))
               for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
        x_PD = x_PD + self.attn.proj(torch.cat([o.transpose(0, 1) for o in out]).reshape(P, D))
        h = F.gelu(self.mlp.linear_fc1(self.norm2(x_PD)), approximate=self.approximate)
        return x_PD + self.mlp.linear_fc2(h)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary over the whole head (x [P, heads, hd]; cos, sin [P, hd]), in fp32."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, M = cfg.hidden_size, cfg.spatial_merge_size**2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(cfg.in_channels, D, kernel_size=(cfg.temporal_patch_size, cfg.patch_size,
                                                                          cfg.patch_size))
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, D)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = nn.Module()
        self.merger.norm = nn.LayerNorm(D, eps=1e-6)
        self.merger.linear_fc1 = nn.Linear(M * D, M * D)
        self.merger.linear_fc2 = nn.Linear(M * D, cfg.out_hidden_size)
        head_dim = D // cfg.num_heads
        self.register_buffer("inv_freq", self._frequencies(head_dim), persistent=False)

    def _frequencies(self, head_dim: int) -> torch.Tensor:
        spatial = head_dim // 2
        return 1.0 / (self.cfg.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float32) / spatial))

    def reset_buffers(self) -> None:
        """inv_freq again, in fp32 (a model built on the meta device and cast has none)."""
        self.inv_freq = self._frequencies(self.cfg.hidden_size // self.cfg.num_heads).to(self.inv_freq.device)

    @torch.inference_mode()
    def forward(self, patches: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        """patches [P, C * t_patch * patch^2] of images with patch grids `grids` -> [P / M, E]:
        the embeddings of their image tokens, image after image."""
        cfg = self.cfg
        weight = self.patch_embed.proj.weight
        x = F.linear(patches.to(weight.dtype), weight.view(weight.shape[0], -1), self.patch_embed.proj.bias)
        rows, cols = patch_rows_cols(grids, cfg.spatial_merge_size)  # host: the layout of the images
        x = x + self._positions(rows, cols, grids).to(x.dtype)
        rows_cols = torch.stack([rows, cols], dim=-1).to(x.device)
        freqs = rows_cols[..., None].float() * self.inv_freq  # [P, 2, hd / 4]
        angles = freqs.flatten(1).repeat(1, 2)  # [P, hd]: (rows, cols) frequencies, twice
        cos, sin = angles.cos(), angles.sin()
        lengths = [h * w for t, h, w in grids for _ in range(t)]
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
        M = cfg.spatial_merge_size**2
        x = self.merger.norm(x).view(-1, M * x.shape[-1])
        return self.merger.linear_fc2(F.gelu(self.merger.linear_fc1(x)))

    def _positions(self, rows: torch.Tensor, cols: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        """The learned square position grid resampled (bilinear, corners aligned) to each image: [P, D]."""
        side = int(self.cfg.num_position_embeddings**0.5)
        heights = torch.cat([torch.full((t * h * w,), h) for t, h, w in grids])
        widths = torch.cat([torch.full((t * h * w,), w) for t, h, w in grids])
        h_taps, h_weights = _bilinear_taps(rows, heights, side)
        w_taps, w_weights = _bilinear_taps(cols, widths, side)
        index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
        weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
        table = self.pos_embed.weight
        weights = weights[:, :, None].to(table.device, table.dtype)
        return (self.pos_embed(index.to(table.device)) * weights).sum(1)
