"""A flat batch (B sequences' rows in turn, T in all) as a padded [B, N] grid and back, for the
batched torch versions of ops that work per sequence. N is the longest sequence (from the host
lengths, so no sync); grid cells past a sequence's end repeat row T - 1, and callers mask them."""

from __future__ import annotations

import torch


def padded_rows(query_start: torch.Tensor, N: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [B, N]: each cell's row in the flat batch, lens [B]: each sequence's rows)."""
    steps = torch.arange(N, device=query_start.device)
    return (query_start[:-1, None] + steps).clamp(max=T - 1), torch.diff(query_start)


def unpad(grid: torch.Tensor, query_lens: list[int]) -> torch.Tensor:
    """[B, N, ...] -> the flat batch [T, ...]: each sequence's first query_lens[b] cells."""
    B, N = grid.shape[:2]
    if N == 1:  # decodes: one row each, already in order
        return grid[:, 0]
    flat = torch.tensor([b * N + i for b, n in enumerate(query_lens) for i in range(n)], device=grid.device)
    return grid.reshape(B * N, *grid.shape[2:])[flat]
