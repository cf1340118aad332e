"""Loading Hugging Face models and tokenizers from local directories, offline."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import transformers
from torch import nn

from .errors import LowrankError
from .json_files import read_json_object
from .nn.experts import unfuse_experts

log = logging.getLogger("lowrank")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def read_model_config(path: str | Path, trust_remote_code: bool = False) -> dict:
    """Return the parsed ``config.json`` of a model directory, or raise a one-line error.

    Besides the file itself this checks what transformers would otherwise report late or not at all:
    a missing or unknown ``model_type``, and code shipped in the directory (``auto_map``), which
    lowrank runs only when ``trust_remote_code`` is set.
    """
    path = Path(path)
    if not path.exists():
        raise LowrankError(f"model directory {str(path)!r} does not exist; pass the path of a Hugging Face model directory")
    if not path.is_dir():
        raise LowrankError(f"{str(path)!r} is a file, not a model directory; pass the directory that holds config.json")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise LowrankError(f"{str(path)!r} is not a model directory (no config.json); pass a Hugging Face model directory")
    config = read_json_object(config_file, "repair or re-download the model")
    model_type = config.get("model_type")
    known = isinstance(model_type, str) and model_type in transformers.CONFIG_MAPPING
    if ships_code(path, config) and not trust_remote_code and not known:
        raise LowrankError(
            f"{str(path)!r} ships its own Python code (auto_map) for model type {model_type!r}, which this transformers lacks; "
            "lowrank runs a model directory's code only with --trust-remote-code (read that code first: it runs with your permissions)"
        )
    if not known and not (trust_remote_code and ships_code(path, config)):
        what = "has no model_type" if model_type is None else f"has model_type {model_type!r}, which transformers {transformers.__version__} does not know"
        raise LowrankError(f"{config_file} {what}; fix config.json or upgrade transformers")
    return config


def ships_code(path: str | Path, config: dict | None = None) -> bool:
    """Whether a model directory names Python code of its own (``auto_map`` in its config or tokenizer config)."""
    path = Path(path)
    if config is None:
        config = json.loads((path / "config.json").read_text())
    if config.get("auto_map"):
        return True
    tokenizer_config = path / "tokenizer_config.json"
    try:
        return bool(tokenizer_config.is_file() and json.loads(tokenizer_config.read_text()).get("auto_map"))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def model_class(config: transformers.PretrainedConfig) -> type[nn.Module]:
    """The transformers class named by ``config.architectures`` (falling back to ``AutoModel``)."""
    for name in config.architectures or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    if config.architectures:
        raise LowrankError(
            f"config.json names the architecture {config.architectures[0]!r}, which transformers {transformers.__version__} lacks; "
            "fix 'architectures' in config.json or upgrade transformers"
        )
    return transformers.AutoModel._model_mapping[type(config)]


def is_causal_lm(config: transformers.PretrainedConfig) -> bool:
    """Whether ``config`` describes a text generator (a causal LM, which returns a next-token loss).

    Its transformers class says so (``can_generate``); for a class transformers lacks (code shipped
    with the model), an architecture named ``*ForCausalLM`` does.
    """
    try:
        cls = model_class(config)
    except LowrankError:
        return any(name.endswith("ForCausalLM") for name in config.architectures or [])
    can_generate = getattr(cls, "can_generate", None)
    return bool(callable(can_generate) and can_generate())


def load_config(path: str | Path, trust_remote_code: bool = False) -> transformers.PretrainedConfig:
    """The model's ``PretrainedConfig``, read offline; never prompts, never runs the directory's code unless trusted."""
    read_model_config(path, trust_remote_code)
    try:
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001  (transformers validates fields with exceptions of several libraries)
        raise LowrankError(f"{Path(path) / 'config.json'} is not a valid configuration ({_first_line(error)}); repair or re-download the model") from None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def check_finite(model: nn.Module, path: str | Path) -> None:
    """Refuse a model with NaN or Inf in any weight: everything computed from it would be garbage."""
    for name, parameter in model.named_parameters():
        if parameter.is_floating_point() and parameter.device.type != "meta" and not torch.isfinite(parameter).all():
            raise LowrankError(f"{str(path)!r} has NaN or Inf values in {name}; repair or re-download the checkpoint")


def load_pretrained(
    path: str | Path, dtype: str | torch.dtype | None = None, device: str = "cpu", trust_remote_code: bool = False
) -> nn.Module:
    """Load a dense Hugging Face model from a local directory, without network access.

    Mixture-of-experts blocks are unfused (:func:`lowrank.nn.unfuse_experts`): same function, one
    ``nn.Linear`` per expert projection. A checkpoint that does not cover the model (a missing
    tensor, which transformers would initialize randomly), a tensor of the wrong shape, an
    unreadable weight file and NaN/Inf weights are one-line errors.

    Args:
        path: directory with ``config.json`` and weights.
        dtype: ``"float32"``, ``"bfloat16"``, ... or a ``torch.dtype``; default: the checkpoint's dtype.
        device: where to put the model.
        trust_remote_code: allow the directory's own Python code (``auto_map``) to run.

    Example:
        >>> model = load_pretrained("../shared/fixtures/pycode-llama")  # doctest: +SKIP
    """
    config = load_config(path, trust_remote_code)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    cls = model_class(config) if not (trust_remote_code and getattr(config, "auto_map", None)) else _remote_class(config)
    try:
        model, info = cls.from_pretrained(
            path, local_files_only=True, dtype=dtype or "auto", output_loading_info=True, trust_remote_code=trust_remote_code
        )
    except LowrankError:
        raise
    except Exception as error:  # noqa: BLE001  (whatever a damaged checkpoint raises becomes one line naming it)
        raise LowrankError(f"could not load the weights in {str(path)!r} ({_first_line(error)}); check that the checkpoint is complete and matches config.json") from None
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise LowrankError(
            f"the checkpoint in {str(path)!r} lacks {len(missing)} weights of the model, e.g. {missing[0]!r}; "
            "the weight files are incomplete or config.json names another architecture"
        )
    if info["unexpected_keys"]:
        log.warning("ignoring %d tensors of %s that the model does not use, e.g. %s", len(info["unexpected_keys"]), path, min(info["unexpected_keys"]))
    check_finite(model, path)
    # Fused mixture-of-experts weights become one nn.Linear per expert (same outputs), so every stage
    # sees, calibrates and compresses each expert; lowrank.save fuses them back for a dense model.
    unfuse_experts(model)
    return model.to(device).eval()


def _remote_class(config):
    auto_map = config.auto_map
    return transformers.AutoModelForCausalLM if "AutoModelForCausalLM" in auto_map else transformers.AutoModel


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """Load the tokenizer stored beside a model; ``None`` if the directory has no tokenizer files.

    Tokenizer files that exist but cannot be read are a one-line error, not a silent ``None``.
    """
    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001  (tokenizers raise their own exception types)
        raise LowrankError(f"could not read the tokenizer in {str(path)!r} ({_first_line(error)}); repair or remove its tokenizer files") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
