"""Saved directories that plain transformers loads too: modeling code written beside the weights.

:func:`write_remote_code` copies ``modeling_lowrank.py`` (this package's template, standard library
+ torch + transformers only) into a directory written by :func:`lowrank.save`, names the transformers
classes it extends (the base model's ``config.architectures[0]``, and the base model that holds),
lists the unfused mixture-of-experts blocks and every compressed layer with its structure under
``lowrank`` in ``config.json``, and points ``auto_map`` at the file for every transformers Auto
class that builds that architecture, and for ``AutoModel``. Then, without lowrank installed::

    AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)  # AutoModel for an encoder

gives the model :func:`lowrank.load` gives (``AutoModel`` on a decoder: its base model, no head). ``config.json`` keeps the base ``model_type`` and
``architectures``, so transformers' config class is the base one, and :func:`lowrank.load` (which
never executes the file) builds the model from its own code as before.
"""

from __future__ import annotations

import json
import logging
import re
from importlib import resources
from pathlib import Path

import transformers
from safetensors import safe_open

log = logging.getLogger(__name__)

MODELING_FILE = "modeling_lowrank.py"
REMOTE_CLASS = "LowRankModel"  # extends the saved architecture
REMOTE_BASE_CLASS = "LowRankBaseModel"  # extends the class AutoModel builds (the architecture without its head)
CONFIG_KEY = "lowrank"
# Constructor arguments (beyond in_features, out_features, bias) of each structure that
# modeling_lowrank.py implements; the state-dict layout of each is checked against lowrank.nn in tests.
REMOTE_STRUCTURES = {
    "LowRankLinear": ("rank",),
    "LowRankPlusSparseLinear": ("rank", "num_nonzero"),
    "DictionaryLinear": ("num_atoms", "nonzeros"),
    "LowRankQuantLinear": ("rank", "bits", "group_size"),
    "LowRankQuantSparseLinear": ("rank", "bits", "group_size", "num_nonzero"),
    "QuantizedCorrectionLinear": ("rank", "bits", "group_size", "factor_bits", "factor_group_size"),
    "ResizedLinear": (),
    "HeadPaddedLinear": ("heads", "head_dim", "kept"),
    "HeadSlicedLinear": ("heads", "head_dim", "kept"),
    "HeadScatteredLinear": ("heads", "head_dim", "kept"),
}
# The Auto classes that may build the saved architecture; auto_map gets each one that does, and
# AutoModel also when it builds the base model the architecture holds (LlamaModel in LlamaForCausalLM).
AUTO_CLASSES = (
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForMaskedLM",
    "AutoModelForSeq2SeqLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
)


def modeling_source(architecture: str, base_model: str) -> str:
    """The text of ``modeling_lowrank.py`` for a model extending transformers' ``architecture`` (and ``base_model``) class."""
    source = resources.files(__package__).joinpath(MODELING_FILE).read_text()
    for constant, value in (("BASE_ARCHITECTURE", architecture), ("BASE_MODEL", base_model)):
        source, count = re.subn(rf'^{constant} = "\w+"', f"{constant} = {json.dumps(value)}", source, flags=re.M)
        assert count == 1, f"modeling_lowrank.py must assign {constant} once"
    return source


def saved_weight_names(directory: Path) -> list[str]:
    """The tensor names in a directory's safetensors files (read from their headers)."""
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    names = []
    for file in files:
        with safe_open(str(directory / file), framework="pt") as weights:
            names.extend(weights.keys())
    return names


def auto_classes(config: dict, weight_names: list[str]) -> dict[str, str]:
    """``{Auto class: transformers class it builds}`` for a saved model: every class in :data:`AUTO_CLASSES` that
    builds its first architecture, and ``AutoModel`` when it builds the base model that architecture holds under
    its ``base_model_prefix`` (``LlamaModel`` as ``model`` in ``LlamaForCausalLM``, seen in the weight names);
    empty when no Auto class builds the architecture."""
    architecture, model_type = (config.get("architectures") or [None])[0], config.get("model_type")
    config_class = transformers.CONFIG_MAPPING[model_type] if model_type in transformers.CONFIG_MAPPING else None
    if architecture is None or config_class is None:
        return {}
    built = {}
    for name in AUTO_CLASSES:
        mapping = getattr(transformers, name)._model_mapping
        if config_class in mapping:
            built[name] = getattr(mapping[config_class], "__name__", None)
    if architecture not in built.values():
        return {}
    prefix = getattr(getattr(transformers, architecture), "base_model_prefix", "") + "."
    holds_base_model = prefix != "." and any(name.startswith(prefix) for name in weight_names)
    return {name: cls for name, cls in built.items() if cls == architecture or (name == "AutoModel" and holds_base_model)}


def unsupported_reason(config: dict, lowrank_config: dict, weight_names: list[str]) -> str | None:
    """Why the modeling file cannot rebuild this model, or ``None`` when it can."""
    architectures = config.get("architectures") or []
    if len(architectures) != 1 or not hasattr(transformers, architectures[0]):
        return f"config.json names architectures {architectures}, not one transformers class"
    structures = sorted({spec["structure"] for spec in lowrank_config["modules"].values()} - set(REMOTE_STRUCTURES))
    if structures:
        return f"modeling_lowrank.py does not implement {', '.join(structures)}"
    if not auto_classes(config, weight_names):
        return f"no transformers Auto class among {', '.join(AUTO_CLASSES)} builds {architectures[0]}"
    return None


def remote_config(lowrank_config: dict) -> dict:
    """What ``modeling_lowrank.py`` reads: the unfused experts blocks and ``{layer: constructor arguments}``."""
    layers = {}
    for name, spec in lowrank_config["modules"].items():
        keys = ("structure", "in_features", "out_features", "bias", *REMOTE_STRUCTURES[spec["structure"]])
        layers[name] = {key: spec[key] for key in keys}
    return {"unfused_experts": list(lowrank_config.get("unfused_experts", [])), "layers": layers}


def write_remote_code(directory: str | Path, lowrank_config: dict) -> bool:
    """Make a directory saved by :func:`lowrank.save` loadable with ``trust_remote_code=True`` alone.

    Writes ``modeling_lowrank.py`` and adds ``auto_map`` and ``lowrank`` to ``config.json``. A model
    the file cannot rebuild (a structure it does not implement, an architecture that is not one
    transformers class built by an Auto class) gets neither, with a logged note; any earlier
    ``auto_map`` model entries and ``lowrank`` entry (carried over from a loaded model's config) are
    removed either way, since they would describe other weights.

    Args:
        directory: the saved directory, with ``config.json`` written.
        lowrank_config: the contents of its ``lowrank_config.json`` (``modules``, ``unfused_experts``).

    Returns:
        Whether the modeling code was written.

    Example:
        >>> write_remote_code("out/pycode-30", json.load(open("out/pycode-30/lowrank_config.json")))  # doctest: +SKIP
        True
    """
    directory = Path(directory)
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config.pop(CONFIG_KEY, None)
    kept = {key: value for key, value in (config.pop("auto_map", None) or {}).items() if not key.startswith(("AutoModel", "AutoConfig"))}
    weight_names = saved_weight_names(directory)
    reason = unsupported_reason(config, lowrank_config, weight_names)
    if reason is None:
        architecture, built = config["architectures"][0], auto_classes(config, weight_names)
        (directory / MODELING_FILE).write_text(modeling_source(architecture, built.get("AutoModel", architecture)))
        module = Path(MODELING_FILE).stem
        kept.update({name: f"{module}.{REMOTE_CLASS if cls == architecture else REMOTE_BASE_CLASS}" for name, cls in built.items()})
        config[CONFIG_KEY] = remote_config(lowrank_config)
    else:
        (directory / MODELING_FILE).unlink(missing_ok=True)
        log.info("the saved model loads with lowrank.load only, not with transformers' trust_remote_code: %s", reason)
    if kept:
        config["auto_map"] = kept
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return reason is None
