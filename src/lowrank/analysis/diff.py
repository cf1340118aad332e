"""``diff``: what fine-tuning changed in each weight matrix — the spectrum of ΔW and intruder dimensions.

Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs full fine-tuning: an illusion of
equivalence") are top singular vectors of the tuned matrix that resemble no singular vector of
the base matrix: their largest |cosine similarity| to every base singular vector stays below a
threshold. LoRA tends to create them; full fine-tuning mostly rotates existing directions.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LowrankError
from .analyze import matrix_of, torch_threads, weight_matrices
from .spectra import spectrum_metrics


def intruder_similarities(base: torch.Tensor, tuned: torch.Tensor, top_k: int = 10) -> torch.Tensor:
    """For each of the tuned matrix's ``top_k`` left singular vectors, its largest |cosine| with any
    left singular vector of the base matrix (1 = an existing direction, near 0 = an intruder).

    Args:
        base: (out, in) base weight.
        tuned: (out, in) fine-tuned weight, same shape.
        top_k: number of the tuned matrix's leading singular vectors to check.

    Example:
        >>> w = torch.randn(6, 4)
        >>> intruder_similarities(w, w, top_k=3).round(decimals=6).tolist()
        [1.0, 1.0, 1.0]
    """
    assert base.shape == tuned.shape, f"shapes differ: {tuple(base.shape)} vs {tuple(tuned.shape)}"
    base_vectors = torch.linalg.svd(base.to(torch.float64), full_matrices=False).U
    tuned_vectors = torch.linalg.svd(tuned.to(torch.float64), full_matrices=False).U[:, :top_k]
    # Singular vectors are unit length, so their dot products are the cosines.
    return (tuned_vectors.T @ base_vectors).abs().max(dim=1).values


@torch.no_grad()
def diff(
    base: nn.Module,
    tuned: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    top_k: int = 10,
    threshold: float = 0.5,
    progress: bool = True,
    num_threads: int | None = 1,
) -> pd.DataFrame:
    """Per weight matrix, the spectrum and rank of ΔW = W_tuned − W_base and the intruder dimensions.

    Columns: ``name``, ``out_features``, ``in_features``; ``delta_frobenius_norm``,
    ``relative_delta`` (‖ΔW‖_F / ‖W_base‖_F), ``delta_spectral_norm``, ``delta_nuclear_norm``,
    ``delta_stable_rank``, ``delta_effective_rank``, ``delta_rank_90``, ``delta_rank_99`` (all 0
    when nothing changed); ``intruders`` (how many of the tuned matrix's ``top_k`` left singular
    vectors have |cosine| < ``threshold`` with every base singular vector),
    ``min_similarity`` (the smallest of those largest cosines) and ``delta_singular_values``.

    Args:
        base: the model before fine-tuning.
        tuned: the fine-tuned model (same architecture; replaced layers are multiplied out).
        include: regexes of layer names to compare (default: linear layers in the blocks).
        exclude: regexes of layer names to skip.
        top_k: leading singular vectors of each tuned matrix checked for intrusion.
        threshold: a tuned singular vector whose best |cosine| with the base is below this is an intruder.
        progress: show a progress bar.
        num_threads: torch CPU threads for the decompositions (``None``: torch's setting).

    Raises:
        LowrankError: if a compared layer is missing from ``tuned`` or has another shape.

    Example:
        >>> table = diff(base_model, tuned_model)  # doctest: +SKIP
        >>> table[["name", "relative_delta", "intruders"]]  # doctest: +SKIP
    """
    modules = weight_matrices(base, include, exclude)
    with torch_threads(num_threads):
        matrices = tqdm(modules.items(), desc="diff", disable=not progress, unit="matrix")
        rows = [compare_matrices(name, module, tuned, top_k, threshold) for name, module in matrices]
    return pd.DataFrame(rows)


def compare_matrices(name: str, module: nn.Module, tuned: nn.Module, top_k: int, threshold: float) -> dict:
    """One row of :func:`diff`: layer ``name`` of the base (``module``) against the same layer of ``tuned``."""
    try:
        tuned_module = tuned.get_submodule(name)
    except AttributeError:
        raise LowrankError(f"the tuned model has no layer {name!r}; compare models of the same architecture") from None
    base_weight = matrix_of(module).to(torch.float64)
    tuned_weight = matrix_of(tuned_module).to(torch.float64).to(base_weight.device)
    if tuned_weight.shape != base_weight.shape:
        raise LowrankError(
            f"layer {name!r} is {tuple(base_weight.shape)} in the base but {tuple(tuned_weight.shape)} in the tuned model; "
            "compare a model with its own fine-tuned version"
        )
    delta_singular = torch.linalg.svdvals(tuned_weight - base_weight)
    metrics = spectrum_metrics(delta_singular)
    similarities = intruder_similarities(base_weight, tuned_weight, top_k)
    base_norm = base_weight.norm().item()
    return {
        "name": name,
        "out_features": base_weight.shape[0],
        "in_features": base_weight.shape[1],
        "delta_frobenius_norm": metrics["frobenius_norm"],
        "relative_delta": metrics["frobenius_norm"] / base_norm if base_norm > 0 else 0.0,
        **{f"delta_{key}": value for key, value in metrics.items() if key != "frobenius_norm"},
        "intruders": int((similarities < threshold).sum().item()),
        "min_similarity": similarities.min().item(),
        "delta_singular_values": delta_singular.cpu().numpy(),
    }
