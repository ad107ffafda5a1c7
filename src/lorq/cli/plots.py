"""PNG figures (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lorq.budget.layout import bits_grid
from lorq.budget.plan import BudgetPlan
from lorq.util.atomic import atomic_file, has_magic

is_png = has_magic(b"\x89PNG")


def plan_heatmap(plan: BudgetPlan, path: str | Path) -> None:
    """Bits/param of every matrix as a layer × module-kind heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, kinds, cells = bits_grid({e.name: e for e in plan.entries})
    data = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), entry in cells.items():
        data[layers.index(layer), kinds.index(kind)] = entry.bits_per_param
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.5 + 0.28 * len(layers)))
    image = ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), [k.split(".")[-1] for k in kinds], rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), ["-" if x is None else str(x) for x in layers])
    ax.set_ylabel("layer")
    planned = plan.adapters_planned
    if planned:  # each cell's rank (·8: 8-bit factors)
        for (layer, kind), e in cells.items():
            at = (kinds.index(kind), layers.index(layer))
            ax.text(*at, e.adapter_label, ha="center", va="center", fontsize=6, color="white")
    ranks = "ranks planned (cells)" if planned else f"r={plan.rank}"
    achieved = plan.achieved_total_bits if planned else plan.achieved_bits
    ax.set_title(
        f"{plan.method} {ranks}: budget {plan.budget:.3f}, achieved {achieved:.3f} bits/param"
    )
    fig.colorbar(image, ax=ax, label="bits/param")
    fig.tight_layout()
    with atomic_file(path, True, is_png, "PNG") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
