"""Spectral diagnosis of weight matrices: where the low-rank structure is, before compressing or tuning.

``analyze(model)`` gives one table row per matrix; ``write_report`` turns it into CSV, JSON and
an HTML page with figures; ``diff(base, tuned)`` compares a fine-tuned model with its base.
"""

from .analyze import analyze, summary
from .diff import diff
from .powerlaw import PowerLawFit, fit_power_law, submatrix_eigenvalues
from .report import write_report
from .spectra import effective_rank, energy_rank, singular_values, spectrum_metrics, stable_rank
from ..linalg.welore import low_rank_components, welore_ranks

__all__ = [
    "PowerLawFit",
    "analyze",
    "diff",
    "effective_rank",
    "energy_rank",
    "fit_power_law",
    "low_rank_components",
    "singular_values",
    "spectrum_metrics",
    "stable_rank",
    "submatrix_eigenvalues",
    "summary",
    "welore_ranks",
    "write_report",
]
