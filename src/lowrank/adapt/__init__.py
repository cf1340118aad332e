"""Adapters initialized from decompositions, fine-tuning compressed models, PEFT interchange.

Each initialization is a config; one verb applies it::

    stats = lowrank.calibrate(model, tokenizer, text)                      # for the covariance init
    adapt_(model, CovarianceConfig(rank=8, mode="knowledge"), stats=stats)  # in place; base → residual
    finetune(model, tokenizer, train_text, FinetuneConfig(steps=200))
    export_peft(model, "out/adapter", against="original")                   # PeftModel.from_pretrained loads it
"""

from .apply import AdaptReport, adapt_, adapter_layers, base_model, merge_adapters_
from .config import AdapterConfig, config_class, init_names
from .covariance import CovarianceConfig, covariance_factors
from .finetune import FinetuneConfig, FinetuneResult, finetune
from .layer import LoraLinear
from .minor import MinorConfig, minor_factors
from .peft_export import export_peft, import_peft, save_residual_base
from .principal import PrincipalConfig, principal_factors
from .random_init import RandomConfig
from ..linalg.randomized import randomized_svd
from .singular_value import SingularValueConfig, SingularValueLinear
from .welore import TrainableSummary, prepare_welore_, trainable_summary

__all__ = [
    "AdaptReport",
    "AdapterConfig",
    "CovarianceConfig",
    "FinetuneConfig",
    "FinetuneResult",
    "LoraLinear",
    "MinorConfig",
    "PrincipalConfig",
    "RandomConfig",
    "SingularValueConfig",
    "SingularValueLinear",
    "TrainableSummary",
    "adapt_",
    "adapter_layers",
    "base_model",
    "config_class",
    "covariance_factors",
    "export_peft",
    "finetune",
    "import_peft",
    "init_names",
    "merge_adapters_",
    "minor_factors",
    "prepare_welore_",
    "principal_factors",
    "randomized_svd",
    "save_residual_base",
    "trainable_summary",
]
