"""Training with less optimizer memory: GaLore-style gradient projection and SLTrain low-rank + sparse layers.

    model = model_from_config("../shared/fixtures/pycode-llama")
    optimizer = GradientProjectionAdamW(projected_parameter_groups(model, rank=64, proj_type="dct"), lr=1e-3)
    report = pretrain(model, token_ids, PretrainConfig(steps=200), optimizer=optimizer)
"""

from .galore import GradientProjectionAdamW, projected_parameter_groups
from .pretrain import (
    PretrainConfig,
    PretrainReport,
    build_optimizer,
    model_from_config,
    optimizer_state_bytes,
    prepare_model_,
    pretrain,
    training_batch,
)
from .projection import dct_matrix, project, project_back, projection_side, randomized_svd_basis, select_dct_columns, svd_basis
from .sltrain import LowRankSparseConfig, LowRankSparseLinear, merge_low_rank_sparse_, random_support, to_low_rank_sparse_

__all__ = [
    "GradientProjectionAdamW",
    "LowRankSparseConfig",
    "LowRankSparseLinear",
    "PretrainConfig",
    "PretrainReport",
    "build_optimizer",
    "dct_matrix",
    "merge_low_rank_sparse_",
    "model_from_config",
    "optimizer_state_bytes",
    "prepare_model_",
    "pretrain",
    "project",
    "project_back",
    "projected_parameter_groups",
    "projection_side",
    "random_support",
    "randomized_svd_basis",
    "select_dct_columns",
    "svd_basis",
    "to_low_rank_sparse_",
    "training_batch",
]
