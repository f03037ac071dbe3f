"""Heatmaps of expert load: one row per MoE layer, one column per expert replica slot, grouped by
worker (white lines between workers). A replicated expert's slots show its load / replicas."""

from __future__ import annotations

from pathlib import Path


def slot_loads(load: list[list[float]], held: list[list[list[int]]]) -> tuple[list[list[float]], list[list[int]]]:
    """Per layer, the load of each held replica in worker order, and where each worker ends."""
    rows, bounds = [], []
    for layer, layer_held in enumerate(held):
        replicas = [0] * len(load[layer])
        for ids in layer_held:
            for e in ids:
                replicas[e] += 1
        rows.append([load[layer][e] / replicas[e] for ids in layer_held for e in ids])
        ends, total = [], 0
        for ids in layer_held[:-1]:
            total += len(ids)
            ends.append(total)
        bounds.append(ends)
    width = max(len(r) for r in rows)
    return [r + [0.0] * (width - len(r)) for r in rows], bounds


def write_heatmap(path: str | Path, load: list[list[float]], held: list[list[list[int]]], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, bounds = slot_loads(load, held)
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.5 * len(rows)))
    image = ax.imshow(rows, aspect="auto", cmap="viridis", interpolation="nearest")
    for layer, ends in enumerate(bounds):  # worker boundaries differ per layer once replicas move
        ax.vlines([x - 0.5 for x in ends], layer - 0.5, layer + 0.5, color="white", linewidth=1.5)
    ax.set_yticks(range(len(rows)))
    ax.set_xlabel("expert replica slots, grouped by expert worker")
    ax.set_ylabel("MoE layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="routed (token, expert) pairs in the window")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
