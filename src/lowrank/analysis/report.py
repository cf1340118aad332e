"""Writing an analysis: CSV and JSON tables, PNG figures and an HTML page that shows them.

Figures are drawn on ``matplotlib.figure.Figure`` objects directly (no pyplot), so nothing
depends on a display or on global plotting state.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .analyze import SPECTRUM_COLUMNS, summary

FIGURE_COLUMNS = 4


def kinds_of(table: pd.DataFrame) -> list[str]:
    """Layer types (names inside a block, e.g. ``self_attn.q_proj``) in order of appearance."""
    return list(dict.fromkeys(table["kind"]))


def _grid(count: int, title: str) -> tuple[Figure, list]:
    columns = min(FIGURE_COLUMNS, count)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(4 * columns, 3.2 * rows), layout="constrained")
    figure.suptitle(title)
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for unused in axes[count:]:
        unused.set_visible(False)
    return figure, axes[:count]


def _depth_colors(count: int) -> list:
    colormap = matplotlib.colormaps["viridis"]
    return [colormap(i / max(count - 1, 1)) for i in range(count)]


def plot_spectra(table: pd.DataFrame) -> Figure:
    """Singular values against their index (log-log), one panel per layer type, one line per block."""
    kinds = kinds_of(table)
    figure, axes = _grid(len(kinds), "Singular values per layer type (colour: depth)")
    for axis, kind in zip(axes, kinds):
        rows = table[table["kind"] == kind]
        for color, (_, row) in zip(_depth_colors(len(rows)), rows.iterrows()):
            values = row["singular_values"]
            axis.loglog(np.arange(1, values.size + 1), values, color=color, label=str(row["layer"]))
        axis.set_title(kind, fontsize=9)
        axis.set_xlabel("index")
        axis.set_ylabel("σ")
    return figure


def plot_effective_rank(table: pd.DataFrame) -> Figure:
    """Heat map of effective rank / full rank: blocks down, layer types across, values written in."""
    blocks = table.dropna(subset=["layer"])
    grid = blocks.assign(share=blocks["effective_rank"] / blocks[["out_features", "in_features"]].min(axis=1))
    grid = grid.pivot_table(index="layer", columns="kind", values="share", sort=False)
    figure = Figure(figsize=(1.3 * grid.shape[1] + 2.5, 0.45 * grid.shape[0] + 2), layout="constrained")
    axis = figure.subplots()
    image = axis.imshow(grid.to_numpy(dtype=float), cmap="magma", vmin=0, vmax=1, aspect="auto")
    axis.set_xticks(range(grid.shape[1]), grid.columns, rotation=30, ha="right", fontsize=8)
    axis.set_yticks(range(grid.shape[0]), grid.index)
    axis.set_ylabel("block")
    for (i, j), value in np.ndenumerate(grid.to_numpy(dtype=float)):
        if not np.isnan(value):
            axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.6 else "black")
    figure.colorbar(image, ax=axis, label="effective rank / full rank")
    axis.set_title("Effective rank (exp of spectral entropy)")
    return figure


def plot_alpha(table: pd.DataFrame) -> Figure:
    """α (solid) and aspect-ratio-debiased α (dashed) against block index, one line per layer type."""
    blocks = table.dropna(subset=["layer"])
    figure = Figure(figsize=(7, 4), layout="constrained")
    axis = figure.subplots()
    for index, kind in enumerate(kinds_of(blocks)):
        rows = blocks[blocks["kind"] == kind]
        color = f"C{index % 10}"
        axis.plot(rows["layer"], rows["alpha"], marker="o", color=color, label=kind)
        axis.plot(rows["layer"], rows["alpha_debiased"], linestyle="--", color=color)
    axis.axhspan(2, 6, color="green", alpha=0.08, label="2 ≤ α ≤ 6 (well trained)")
    axis.set_xlabel("block")
    axis.set_ylabel("α")
    axis.set_title("Heavy-tail exponent α per block (dashed: debiased)")
    axis.legend(fontsize=7, ncol=2)
    return figure


def plot_error_curves(table: pd.DataFrame) -> Figure:
    """Relative error of the best rank-k approximation against k / full rank, one panel per layer type.

    With calibration (``whitened_singular_values``) this is the predicted relative output error;
    otherwise the relative squared Frobenius error of the weight.
    """
    column = "whitened_singular_values" if "whitened_singular_values" in table else "singular_values"
    label = "relative output error" if column.startswith("whitened") else "relative ‖W − W_k‖²_F"
    kinds = kinds_of(table)
    figure, axes = _grid(len(kinds), f"Error against kept rank ({label})")
    for axis, kind in zip(axes, kinds):
        rows = table[table["kind"] == kind]
        for color, (_, row) in zip(_depth_colors(len(rows)), rows.iterrows()):
            values = row[column]
            if not isinstance(values, np.ndarray):
                continue
            energy = values**2
            discarded = 1.0 - np.concatenate([[0.0], np.cumsum(energy)]) / energy.sum()
            axis.semilogy(np.arange(values.size + 1) / values.size, np.clip(discarded, 1e-12, None), color=color)
        axis.set_title(kind, fontsize=9)
        axis.set_xlabel("kept rank / full rank")
        axis.set_ylabel(label)
    return figure


FIGURES = {
    "spectra.png": (plot_spectra, "Singular values of every matrix, by layer type; lighter lines are deeper blocks."),
    "effective_rank.png": (plot_effective_rank, "Effective rank relative to full rank, per block and layer type: dark cells are the low-rank ones."),
    "alpha.png": (plot_alpha, "Heavy-tail exponent α per block (weightwatcher convention); dashed lines are the aspect-ratio-debiased α."),
    "error_vs_rank.png": (plot_error_curves, "How fast the error falls as rank is kept: curves that drop early mark compressible matrices."),
}


def plain_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table without its array columns (the spectra), ready for CSV/JSON/HTML."""
    return table.drop(columns=[column for column in SPECTRUM_COLUMNS if column in table])


def write_report(table: pd.DataFrame, out_dir: str | Path, title: str = "lowrank analysis") -> Path:
    """Write ``analysis.csv``, ``analysis.json`` (summary + rows), PNG figures and ``report.html`` into ``out_dir``.

    Args:
        table: the result of :func:`lowrank.analysis.analyze`.
        out_dir: an existing directory (the CLI passes a temporary one that it renames at the end).
        title: heading of the HTML page.

    Returns:
        The path of ``report.html``.

    Example:
        >>> write_report(analyze(model), "report/")  # doctest: +SKIP
    """
    out = Path(out_dir)
    rows = plain_table(table)
    means = summary(table)
    rows.to_csv(out / "analysis.csv", index=False)
    records = json.loads(rows.to_json(orient="records"))
    (out / "analysis.json").write_text(json.dumps({"summary": means, "matrices": records}, indent=1) + "\n")
    sections = []
    for file_name, (draw, caption) in FIGURES.items():
        figure = draw(table)
        figure.savefig(out / file_name, dpi=90)
        sections.append(f'<figure><img src="{file_name}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>')
    summary_rows = "".join(f"<tr><th>{html.escape(key)}</th><td>{value:.4g}</td></tr>" for key, value in means.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}} img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1>
<h2>Model summary (means over {len(rows)} matrices)</h2><table>{summary_rows}</table>
<h2>Figures</h2>{''.join(sections)}
<h2>Per matrix</h2>{rows.to_html(index=False, float_format=lambda value: f"{value:.4g}", na_rep="")}
</body></html>
"""
    (out / "report.html").write_text(page)
    return out / "report.html"
