"""Expert-load pictures, drawn from `/v1/experts` data (one PNG, snapshots side by side).

Top: per MoE layer (rows) and expert worker (columns), the worker's load over the layer's mean —
the number that sets a MoE layer's pace (its slowest worker) — annotated, on one diverging colour
scale centred at 1 for every snapshot, so "before" and "after" compare at a glance. Below, the detail:
per-slot load (one column per expert replica slot, grouped by worker, white lines between workers; a
replicated expert's slots show its load / replicas), again on one scale for every snapshot.
"""

from __future__ import annotations

from pathlib import Path

from router.planner import worker_loads


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


def worker_vs_mean(load: list[list[float]], held: list[list[list[int]]]) -> list[list[float]]:
    """[layer][worker]: the worker's load (replicated experts' load split evenly) / the layer's mean."""
    out = []
    for layer_load, layer_held in zip(load, held):
        per_worker = worker_loads(layer_load, layer_held)
        mean = sum(per_worker) / len(per_worker)
        out.append([w / mean if mean else 1.0 for w in per_worker])
    return out


def write_heatmap(path: str | Path, snapshots: list[tuple[str, list[list[float]], list[list[list[int]]]]]) -> Path:
    """snapshots: (label, load [layer][expert], placement [layer][worker][expert ids]) each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    ratios = [worker_vs_mean(load, held) for _, load, held in snapshots]
    slots = [slot_loads(load, held) for _, load, held in snapshots]
    top = max(max(max(r) for r in ratio) for ratio in ratios)
    ratio_norm = TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=max(top, 1.01))
    slot_max = max(max(max(r) for r in rows) for rows, _ in slots) or 1.0
    layers = len(ratios[0])
    fig, axes = plt.subplots(2, len(snapshots), figsize=(7 * len(snapshots), 2.5 + 1.0 * layers), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 1]})
    for column, ((label, _, _), ratio, (rows, bounds)) in enumerate(zip(snapshots, ratios, slots)):
        ax = axes[0][column]
        image = ax.imshow(ratio, aspect="auto", cmap="RdBu_r", norm=ratio_norm, interpolation="nearest")
        for layer, values in enumerate(ratio):
            for worker, value in enumerate(values):
                ax.text(worker, layer, f"{value:.2f}", ha="center", va="center", fontsize=9)
        busiest = max(max(r) for r in ratio)
        ax.set_title(f"{label}: worker load / layer mean (busiest {busiest:.2f})")
        ax.set_xticks(range(len(ratio[0])))
        ax.set_xlabel("expert worker")
        ax.set_yticks(range(layers))
        ax.set_ylabel("MoE layer")
        fig.colorbar(image, ax=ax, label="load / mean (1 = even)")
        ax = axes[1][column]
        image = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=0, vmax=slot_max, interpolation="nearest")
        for layer, ends in enumerate(bounds):  # worker boundaries differ per layer once replicas move
            ax.vlines([x - 0.5 for x in ends], layer - 0.5, layer + 0.5, color="white", linewidth=1.5)
        ax.set_yticks(range(layers))
        ax.set_xlabel("expert replica slots, grouped by expert worker")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"{label}: load per replica slot (detail)")
        fig.colorbar(image, ax=ax, label="routed (token, expert) pairs in the window")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
