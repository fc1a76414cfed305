"""Analysis output for people: a per-layer text table and a heat map (layers x metrics) PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

HEATMAP_METRICS = (
    ("attn redundancy", lambda e: (e["attention"] or {}).get("redundancy")),
    ("mlp redundancy", lambda e: (e["mlp"] or {}).get("redundancy")),
    ("block influence", lambda e: e["block_influence"]),
    ("attn ZD", lambda e: (e["attention"] or {}).get("zd")),
    ("mlp ZD", lambda e: (e["mlp"] or {}).get("zd")),
    ("log10 max |a|", lambda e: e["max_abs_activation"]),
    ("massive acts", lambda e: e["massive_activations"]["count"]),
    ("sink share", lambda e: (e["attention"] or {}).get("sink_share")),
    ("attn removal JS", lambda e: (e["attention"] or {}).get("removal_js")),
    ("mlp removal JS", lambda e: (e["mlp"] or {}).get("removal_js")),
)


def _fmt(value, spec=".4f") -> str:
    return "-" if value is None else format(value, spec)


def layer_table(analysis: dict) -> str:
    head = (f"{'layer':>5} {'attn red':>9} {'mlp red':>9} {'BI':>7} {'attn ZD':>8} {'mlp ZD':>8} "
            f"{'max|a|':>9} {'massive':>7} {'sink':>6} {'attn JS':>8} {'mlp JS':>8}")
    rows = [head, "-" * len(head)]
    for e in analysis["layers"]:
        att, mlp = e["attention"] or {}, e["mlp"] or {}
        rows.append(
            f"{e['layer']:>5} {_fmt(att.get('redundancy')):>9} {_fmt(mlp.get('redundancy')):>9} "
            f"{e['block_influence']:>7.4f} {_fmt(att.get('zd')):>8} {_fmt(mlp.get('zd')):>8} "
            f"{e['max_abs_activation']:>9.1f} {e['massive_activations']['count']:>7} "
            f"{_fmt(att.get('sink_share'), '.3f'):>6} {_fmt(att.get('removal_js'), '.5f'):>8} "
            f"{_fmt(mlp.get('removal_js'), '.5f'):>8}")
    supers = analysis.get("super_weight_candidates") or []
    if supers:
        rows.append("super-weight candidates (down_proj): " + ", ".join(
            f"layer {s['layer']} [{s['row']}, {s['column']}] = {s['weight']:.3g} (output peak {s['output_peak']:.0f})"
            for s in supers))
    return "\n".join(rows)


def heatmap(analysis: dict, path: str | Path) -> None:
    """Each metric column is scaled to its own range so that every column is readable."""
    import matplotlib  # lazy like the optional dependencies: only plotting needs it, and it is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = analysis["layers"]
    names, columns = [], []
    for name, getter in HEATMAP_METRICS:
        values = [getter(e) for e in layers]
        if all(v is None for v in values):
            continue
        if name.startswith("log10"):
            values = [None if v is None else math.log10(max(v, 1e-6)) for v in values]
        names.append(name)
        columns.append([np.nan if v is None else float(v) for v in values])
    raw = np.array(columns).T  # layers x metrics
    low, high = np.nanmin(raw, axis=0), np.nanmax(raw, axis=0)
    scaled = (raw - low) / np.where(high > low, high - low, 1.0)
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 0.32 * len(layers) + 1.8))
    image = ax.imshow(np.ma.masked_invalid(scaled), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    ax.set_yticks(range(len(layers)), [str(e["layer"]) for e in layers])
    ax.set_ylabel("layer")
    for i in range(raw.shape[0]):
        for j in range(raw.shape[1]):
            if not np.isnan(raw[i, j]):
                ax.text(j, i, f"{raw[i, j]:.3g}", ha="center", va="center", fontsize=6,
                        color="white" if scaled[i, j] < 0.5 else "black")
    model = analysis.get("model", {}).get("name") or analysis.get("model", {}).get("source", "model")
    ax.set_title(f"{model}: per-layer metrics (color scaled per column, raw values printed)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, label="scaled within column")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
