"""The audit report's figures (matplotlib, as PNG bytes) and the grid of example faces.

Kept apart from ``pipeline.audit`` (the numbers) and ``pipeline.audit_html`` (the page): figures read only the
finished audit document and the per-face values it summarises.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from g2face.identity import SAME_PERSON_DISTANCE

from .privacy_metrics import FAR_TARGET

THUMB = 96  # side of an example face in the grid, px

FIGURE_TITLES = {
    "identity_histogram": "Identity distance, original vs anonymized, per face",
    "faces_by_size": "Detected faces by size class and how they were handled",
    "utility_distributions": "Utility distances per face",
    "verification_distances": "Verification: pair distances and the FAR=1e-3 threshold",
}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def make_figures(
    doc: dict, utility_values: dict[str, dict[str, list]], verification_values: dict | None
) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    for row in doc["privacy"]["rows"]:
        h = row["histogram"]
        if row["faces"]:
            ax.stairs(
                h["counts"],
                h["edges"],
                label=f"{row['label']} ({row['faces']} faces)",
                fill=len(doc["privacy"]["rows"]) == 1,
                alpha=0.7,
            )
    ax.axvline(SAME_PERSON_DISTANCE, color="crimson", ls="--", label=f"same-person threshold {SAME_PERSON_DISTANCE}")
    ax.set_xlabel("identity distance, original vs anonymized (dlib)")
    ax.set_ylabel("faces")
    ax.legend(fontsize=8)
    figs["identity_histogram"] = _png(fig)

    cov = doc["coverage"]["by_size_class"]
    fig, ax = plt.subplots(figsize=(6.4, 2.8))
    names = [c["size_class"] for c in cov]
    model = [c["anonymized"] - c["fallback"] for c in cov]
    fallback = [c["fallback"] for c in cov]
    other = [c["faces"] - c["anonymized"] for c in cov]
    ax.bar(names, model, label="job method")
    ax.bar(names, fallback, bottom=model, label="fallback")
    ax.bar(names, other, bottom=np.add(model, fallback), label="image not published")
    ax.set_ylabel("faces")
    ax.set_xlabel("face size class (box side)")
    ax.legend(fontsize=8)
    figs["faces_by_size"] = _png(fig)

    keys = [
        ("landmark68_distance", "68-point landmark distance (px)"),
        ("pose_distance", "pose distance (deg)"),
        ("shape_distance", "shape distance (mm)"),
        ("expression_distance", "expression distance (mm)"),
    ]
    if any(v.get(k) for v in utility_values.values() for k, _ in keys):
        fig, axes = plt.subplots(1, 4, figsize=(10, 2.8))
        for ax, (k, title) in zip(axes, keys):
            data = [[x for x in v.get(k, []) if x is not None] or [np.nan] for v in utility_values.values()]
            ax.boxplot(data, tick_labels=list(utility_values), showfliers=False)
            ax.set_title(title, fontsize=9)
            ax.tick_params(axis="x", labelsize=7, rotation=20)
        figs["utility_distributions"] = _png(fig)

    if verification_values:
        fig, ax = plt.subplots(figsize=(6.4, 3.0))
        bins = np.linspace(0, 1.4, 36)
        for name, vals in verification_values.items():
            if len(vals):
                ax.hist(vals, bins=bins, histtype="step", density=True, label=name)
        t = doc["privacy"]["verification"]["threshold"]
        if t is not None:
            ax.axvline(t, color="crimson", ls="--", label=f"threshold at FAR={FAR_TARGET:g}")
        ax.set_xlabel("identity distance of pairs (dlib)")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
        figs["verification_distances"] = _png(fig)
    return figs


def example_grid(thumbs: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    """Originals on the top row, anonymized faces below, as one PNG."""
    gap = 4
    n = len(thumbs)
    grid = np.full((2 * THUMB + 3 * gap, n * THUMB + (n + 1) * gap, 3), 255, np.uint8)
    for i, (o, a) in enumerate(thumbs):
        x = gap + i * (THUMB + gap)
        grid[gap : gap + THUMB, x : x + THUMB] = o
        grid[2 * gap + THUMB : 2 * gap + 2 * THUMB, x : x + THUMB] = a
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, "PNG")
    return buf.getvalue()
