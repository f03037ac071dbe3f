"""Qwen3.5's multimodal rotary positions (M-RoPE), as transformers' `get_rope_index` computes them.

Every token has three positions (time, row, column). Text tokens have all three equal to a running
counter; an image's tokens (its merged patches, in raster order) have time = the counter and row /
column = the counter plus their row / column in the merged grid, and the counter then moves on by
max(rows, columns). So after an image a sequence's positions run behind its token count by a fixed
`delta` (<= 0), which later tokens keep: position = index + delta, all three equal.

The text model rotates frequency j of each head by the position of axis `mrope_axes(...)[j]`
(interleaved: 1 = row, 2 = column for j % 3 within their sections, else time).
"""

from __future__ import annotations

import torch

Grid = tuple[int, int, int]


def mrope_axes(section: tuple[int, int, int], num_freqs: int) -> torch.Tensor:
    """[num_freqs] which position axis (0 time, 1 row, 2 column) turns each rotary frequency."""
    axes = torch.zeros(num_freqs, dtype=torch.long)
    for axis in (1, 2):
        axes[axis : min(3 * section[axis], num_freqs) : 3] = axis
    return axes


def image_spans(token_ids: list[int], image_token_id: int, grids: list[Grid], merge: int) -> list[int]:
    """Where each image's run of image tokens starts in the prompt (grids in order, patch units);
    ValueError if the prompt's image tokens do not match the images."""
    starts, i, images = [], 0, iter(grids)
    while i < len(token_ids):
        if token_ids[i] != image_token_id:
            i += 1
            continue
        grid = next(images, None)
        if grid is None:
            raise ValueError("the prompt has more image tokens than its images need")
        n = grid[0] * (grid[1] // merge) * (grid[2] // merge)
        if token_ids[i : i + n] != [image_token_id] * n:
            raise ValueError(f"an image needs {n} image tokens in a row; the prompt has fewer")
        starts.append(i)
        i += n
    if next(images, None) is not None:
        raise ValueError("the prompt has fewer image tokens than its images need")
    return starts


def mrope_positions(length: int, spans: list[tuple[int, Grid]], merge: int) -> tuple[torch.Tensor, int]:
    """Positions [3, length] of a prompt with images (first token index, grid in patch units) in
    order, and delta = the next position - length."""
    positions = torch.empty(3, length, dtype=torch.long)
    counter, i = 0, 0
    for start, (t, h, w) in spans:
        positions[:, i:start] = torch.arange(counter, counter + start - i)
        counter += start - i
        h, w = h // merge, w // merge
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        positions[:, start : start + t * h * w] = torch.stack([tt, hh, ww]).reshape(3, -1) + counter
        counter, i = counter + max(h, w), start + t * h * w
    positions[:, i:] = torch.arange(counter, counter + length - i)
    return positions, counter - i  # the last position is counter + (length - i) - 1


def rotary_positions(positions_3L: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    """Per-frequency positions [L, num_freqs] for the rotary kernel, from positions [3, L]."""
    return positions_3L[axes].T.contiguous()
