"""Drawing of a partition summary (``FederatedDataset.summary()``) as a PNG (docs/architecture.md 5)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["plot_partition"]

# Colours of the many / medium / few groups (GROUP_NAMES order).
_GROUP_COLOURS = {"many": "#1f77b4", "medium": "#ff7f0e", "few": "#d62728"}


def plot_partition(summary: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Draws a clients x classes heatmap (log colour), client sizes and class counts coloured by group.

    Uses matplotlib's Agg canvas directly, so no global backend is switched and no display is needed.

    Args:
        summary: a dict from ``FederatedDataset.summary()``.
        path: PNG file to write; parent folders are created.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    counts = np.asarray(summary["client_class_counts"], dtype=np.float64)
    num_clients, num_classes = counts.shape
    fig = Figure(figsize=(14, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    heat_ax, size_ax, class_ax = fig.subplots(1, 3, width_ratios=[2, 1, 1.5])

    # Zeros are masked (drawn blank) because a log scale cannot show them.
    masked = np.ma.masked_less_equal(counts, 0)
    vmax = max(float(counts.max()), 1.0)
    image = heat_ax.imshow(masked, aspect="auto", interpolation="nearest", cmap="viridis", norm=LogNorm(1, vmax))
    heat_ax.set(xlabel="class", ylabel="client", title=f"samples per client and class ({summary.get('source', '')})")
    fig.colorbar(image, ax=heat_ax, label="samples (log)")

    size_ax.barh(np.arange(num_clients), summary["client_sizes"], color="#555555")
    size_ax.invert_yaxis()  # client 0 on top, as in the heatmap
    size_ax.set(xlabel="samples", ylabel="client", title="client sizes")

    groups = summary.get("groups") or ["many"] * num_classes
    colours = [_GROUP_COLOURS.get(g, "#777777") for g in groups]
    class_ax.bar(np.arange(num_classes), summary["class_counts"], color=colours)
    class_ax.set_yscale("log")
    class_ax.set(xlabel="class", ylabel="samples (log)", title=f"class counts ({summary.get('group_convention', '')})")
    sizes = summary.get("group_sizes", {})
    handles = [Patch(color=colour, label=f"{name} ({sizes.get(name, 0)})") for name, colour in _GROUP_COLOURS.items()]
    class_ax.legend(handles=handles, loc="upper right", fontsize="small")
    for ax in (heat_ax, class_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (heat_ax, size_ax):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
