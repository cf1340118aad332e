"""``analyze``: a model in, one table row per weight matrix out (spectra, ranks, heavy tails)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import LayerStatistics
from ..linalg import rank_for_ratio
from ..nn import find_targets, linear_weight
from .powerlaw import fit_power_law, submatrix_eigenvalues
from .spectra import discarded_energy, singular_values, spectrum_metrics
from ..linalg.welore import low_rank_components, welore_ranks

# Model-level means reported by `summary`, weightwatcher's `get_summary()` metrics first.
SUMMARY_METRICS = [
    "log_norm",
    "alpha",
    "alpha_weighted",
    "log_spectral_norm",
    "stable_rank",
    "alpha_debiased",
    "effective_rank",
    "whitened_effective_rank",
]
# Columns holding one array per row (the spectra themselves); left out of CSV files.
SPECTRUM_COLUMNS = ["singular_values", "whitened_singular_values"]
DEFAULT_RATIOS = (0.2, 0.4, 0.6)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch CPU threads (``None``: unchanged), restoring the setting after.

    Matrices of a few hundred rows decompose fastest on one thread: more threads mostly wait on
    each other, and on a machine shared with other jobs they can be ten times slower.
    """
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def weight_matrices(model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None, embeddings: bool = False) -> dict[str, nn.Module]:
    """The modules whose 2-D weights are analyzed, by name.

    By default the linear layers in the transformer blocks (:func:`lowrank.nn.find_targets` with
    ``include``/``exclude``); ``embeddings`` adds the input embedding and an untied output head.
    A weight shared by two modules (tied embeddings) is listed once.
    """
    names = find_targets(model, include=include, exclude=exclude)
    modules = {name: model.get_submodule(name) for name in names}
    if embeddings:
        extra = [model.get_input_embeddings(), model.get_output_embeddings()]
        for name, module in model.named_modules():
            if any(module is wanted for wanted in extra if wanted is not None):
                modules.setdefault(name, module)
    unique, seen = {}, set()
    for name, module in modules.items():
        pointer = module.weight.data_ptr()
        if pointer not in seen:
            seen.add(pointer)
            unique[name] = module
    return unique


def matrix_of(module: nn.Module) -> torch.Tensor:
    """A module's weight as an (out, in) matrix: an embedding's (vocabulary, hidden) table as is, a
    replacement module (``LowRankLinear``, ...) multiplied out by its ``to_dense()``."""
    if isinstance(module, nn.Embedding):
        return module.weight
    if hasattr(module, "to_dense"):
        return module.to_dense()
    return linear_weight(module)


def block_position(name: str) -> tuple[int | None, str]:
    """(block index, name inside the block): ``model.layers.3.mlp.up_proj`` → (3, ``mlp.up_proj``)."""
    match = re.search(r"\.(\d+)\.", name)
    if match is None:
        return None, name
    return int(match.group(1)), name[match.end() :]


def heavy_tail_metrics(singular: torch.Tensor, weight: torch.Tensor, aspect_ratio: float) -> dict[str, float]:
    """weightwatcher's columns for one matrix: α and friends on λ = σ², plus the debiased α."""
    eigenvalues = singular.square()
    fit = fit_power_law(eigenvalues)
    largest = eigenvalues[0].item()
    log_spectral_norm = np.log10(largest) if largest > 0 else -np.inf
    return {
        "alpha": fit.alpha,
        "alpha_weighted": fit.alpha * log_spectral_norm,
        "log_spectral_norm": log_spectral_norm,
        "log_norm": np.log10(eigenvalues.sum().item()) if largest > 0 else -np.inf,
        "xmin": fit.xmin,
        "ks_distance": fit.ks_distance,
        "num_pl_spikes": fit.num_tail,
        "alpha_debiased": fit_power_law(submatrix_eigenvalues(weight, aspect_ratio)).alpha,
    }


def whitened_metrics(weight: torch.Tensor, statistics: LayerStatistics, ratios: Sequence[float]) -> tuple[dict, np.ndarray]:
    """Rank measures of W·S^{1/2} (S = input covariance per token) and the predicted output error at each ratio.

    The output error of the best rank-r replacement is the sum of the discarded squared singular
    values of W·S^{1/2} (mean squared output error per token); ``relative_output_error`` divides
    by the total, the mean squared output itself.
    """
    # One whitening per input, shared by the layers that read it (q/k/v, gate/up); R Rᵀ = XᵀX, so
    # R/√tokens is a root of the per-token covariance.
    root = statistics.whitening().root / max(statistics.num_tokens, 1) ** 0.5
    singular = torch.linalg.svdvals(weight.detach().to(torch.float64, copy=False).to(root.device) @ root)
    metrics = {f"whitened_{metric}": value for metric, value in spectrum_metrics(singular).items() if "norm" not in metric}
    total = singular.square().sum().item()
    out_features, in_features = weight.shape
    for ratio in ratios:
        rank = rank_for_ratio(out_features, in_features, ratio)
        error = discarded_energy(singular, rank) if rank is not None else 0.0
        metrics[f"rank_at_{ratio:g}"] = rank if rank is not None else min(weight.shape)
        metrics[f"output_error_{ratio:g}"] = error
        metrics[f"relative_output_error_{ratio:g}"] = error / total if total > 0 else 0.0
    return metrics, singular.cpu().numpy()


@torch.no_grad()
def analyze(
    model: nn.Module,
    stats: Mapping[str, LayerStatistics] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    embeddings: bool = False,
    reduction: float = 0.3,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    aspect_ratio: float = 1.0,
    progress: bool = True,
    num_threads: int | None = 1,
) -> pd.DataFrame:
    """Spectral diagnosis of every weight matrix: one row per matrix.

    Columns: ``name``, ``module`` (class), ``layer`` (block index), ``kind`` (name inside the block),
    ``out_features``, ``in_features``, ``parameters``; singular-value norms ``spectral_norm``,
    ``nuclear_norm``, ``frobenius_norm``; ``stable_rank`` (‖W‖²_F/‖W‖²₂), ``effective_rank``
    (exp of the spectral entropy), ``rank_90``/``rank_99`` (ranks keeping 90 %/99 % of Σσ²);
    weightwatcher's ``alpha``, ``alpha_weighted`` (α·log₁₀λ_max), ``log_spectral_norm``
    (log₁₀λ_max = log₁₀σ₁², as weightwatcher defines it), ``log_norm`` (log₁₀Σσ²), ``xmin``,
    ``ks_distance``, ``num_pl_spikes``; ``alpha_debiased`` (α of the spectrum averaged over
    submatrices of aspect ratio ``aspect_ratio``); ``welore_rank`` and ``welore_low_rank`` (WeLore
    at ``reduction``); ``singular_values`` (the spectrum, an array). With ``stats``, also
    ``whitened_*`` rank measures of W·S^{1/2}, and per ratio r ``rank_at_r``, ``output_error_r``
    and ``relative_output_error_r`` (predicted error of the rank keeping 1 − r of the parameters),
    plus ``whitened_singular_values``.

    Args:
        model: any model with linear layers (Hugging Face or not).
        stats: calibration statistics from :func:`lowrank.calibrate`; enables the whitened columns.
        include: regexes of layer names to analyze (default: linear layers in the blocks).
        exclude: regexes of layer names to skip.
        embeddings: also analyze the input embedding and an untied output head.
        reduction: parameter reduction at which the WeLore split is computed, in [0, 1).
        ratios: compression ratios at which the output error is predicted (needs ``stats``).
        aspect_ratio: long/short side of the submatrices behind ``alpha_debiased``.
        progress: show a progress bar.
        num_threads: torch CPU threads for the decompositions (see :func:`torch_threads`); ``None``
            keeps torch's setting, which is faster for matrices of thousands of rows on idle cores.

    Example:
        >>> table = analyze(model)  # doctest: +SKIP
        >>> table[["name", "stable_rank", "alpha"]].head()  # doctest: +SKIP
    """
    modules = weight_matrices(model, include, exclude, embeddings)
    with torch_threads(num_threads):
        rows, spectra = analyze_matrices(modules, stats, ratios, aspect_ratio, progress)
    table = pd.DataFrame(rows)
    table["layer"] = table["layer"].astype("Int64")
    shapes = {name: tuple(matrix_of(module).shape) for name, module in modules.items()}
    ranks = welore_ranks(spectra, shapes, reduction)
    low_rank = low_rank_components(ranks, shapes)
    table["welore_rank"] = table["name"].map(ranks)
    table["welore_low_rank"] = table["name"].map(low_rank)
    return table


def analyze_matrices(
    modules: Mapping[str, nn.Module],
    stats: Mapping[str, LayerStatistics] | None,
    ratios: Sequence[float],
    aspect_ratio: float,
    progress: bool,
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The per-matrix part of :func:`analyze`: one row dict per matrix and the spectra by name."""
    rows, spectra = [], {}
    for name, module in tqdm(modules.items(), desc="analyze", disable=not progress, unit="matrix"):
        weight = matrix_of(module)
        singular = singular_values(weight)
        layer, kind = block_position(name)
        row = {
            "name": name,
            "module": type(module).__name__,
            "layer": layer,
            "kind": kind,
            "out_features": weight.shape[0],
            "in_features": weight.shape[1],
            "parameters": weight.numel(),
            **spectrum_metrics(singular),
            **heavy_tail_metrics(singular, weight, aspect_ratio),
            "singular_values": singular.cpu().numpy(),
        }
        if stats is not None and name in stats:
            metrics, whitened = whitened_metrics(weight, stats[name], ratios)
            row.update(metrics, whitened_singular_values=whitened)
        rows.append(row)
        spectra[name] = singular
    return rows, spectra


def summary(table: pd.DataFrame) -> dict[str, float]:
    """Model-level means of the heavy-tail and rank metrics (weightwatcher's ``get_summary()``), plus
    the share of WeLore low-rank components.

    Example:
        >>> summary(analyze(model))["alpha"]  # doctest: +SKIP
        4.1
    """
    result = {metric: float(table[metric].mean()) for metric in SUMMARY_METRICS if metric in table}
    if "welore_low_rank" in table:
        result["welore_low_rank_fraction"] = float(table["welore_low_rank"].mean())
    return result
