"""Every command × every family of bad input, as a careless user or an attacker would type it.

Each row builds its hostile input programmatically (truncated, corrupted or edited copies of a real
model, adapter or run), runs the command in-process through the ``lowrank`` entry point, and checks
what the README promises: a non-zero exit, exactly one ``error:`` line naming the problem, no
traceback, and not one byte of the workspace changed: no new files, no deleted or modified input
(every file is hashed before and after).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowrank.cli.main import run

pytestmark = pytest.mark.filterwarnings("ignore")


# --------------------------------------------------------------------------- the workspace


def _python_text(num_files: int = 40) -> str:
    """Python source from the interpreter's standard library: text to train a tokenizer and calibrate on."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:num_files]
    return "\n".join(path.read_text(encoding="utf-8", errors="replace") for path in files)


def _tokenizer(text: str):
    """A real byte-level BPE tokenizer trained here, offline, on ``text``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator([text], trainers.BpeTrainer(vocab_size=384, special_tokens=["<eos>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")


def _save_model(directory: Path, tokenizer) -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), architectures=["LlamaForCausalLM"], tie_word_embeddings=True,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _adapter(model_dir: Path, out: Path) -> None:
    """A real PEFT LoRA checkpoint for the model, written by peft itself."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(out)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Valid inputs every row starts from: a model, text, a compressed and an elastic model, an adapter."""
    import lowrank
    from lowrank.models import load_pretrained

    root = tmp_path_factory.mktemp("hostile")
    text = _python_text()
    (root / "calib.txt").write_text(text)
    _save_model(root / "model", _tokenizer(text))
    for name, extra in (("compressed", {}), ("elastic", {"elastic": True})):
        model = load_pretrained(root / "model")
        plan = lowrank.allocation.elastic_plan(model, method="svd") if extra else lowrank.allocate(model, 0.4, method="svd")
        report = lowrank.compress_(model, plan, method="svd", progress=False)
        lowrank.save(model, root / name, report=report, tokenizer=lowrank.models.load_tokenizer(root / "model"))
    _adapter(root / "model", root / "adapter")
    (root / "a-file.txt").write_text("not a directory\n")
    (root / "existing").mkdir()
    (root / "existing.json").write_text("{}\n")
    (root / "work").mkdir()
    return root


def _copy(workspace: Path, source: str, name: str) -> Path:
    target = workspace / "cases" / name
    shutil.copytree(workspace / source, target)
    return target


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _edit_weights(path: Path, change) -> None:
    weights = load_file(str(path))
    change(weights)
    save_file(weights, str(path), metadata={"format": "pt"})


# --------------------------------------------------------------------------- hostile inputs, built on demand


def truncated_weights(ws: Path, source: str = "model") -> Path:
    directory = _copy(ws, source, f"truncated-{source}")
    file = directory / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return directory


def empty_weights(ws: Path) -> Path:
    directory = _copy(ws, "model", "empty-weights")
    (directory / "model.safetensors").write_bytes(b"")
    return directory


def garbage_weights(ws: Path) -> Path:
    directory = _copy(ws, "model", "garbage-weights")
    (directory / "model.safetensors").write_bytes(os.urandom(4096))
    return directory


def no_weights(ws: Path) -> Path:
    directory = _copy(ws, "model", "no-weights")
    (directory / "model.safetensors").unlink()
    return directory


def missing_tensor(ws: Path) -> Path:
    directory = _copy(ws, "model", "missing-tensor")
    _edit_weights(directory / "model.safetensors", lambda w: w.pop("model.layers.0.mlp.up_proj.weight"))
    return directory


def wrong_shape(ws: Path) -> Path:
    directory = _copy(ws, "model", "wrong-shape")
    _edit_weights(directory / "model.safetensors", lambda w: w.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(65, 32)}))
    return directory


def non_finite(ws: Path, key: str, value: float) -> Path:
    directory = _copy(ws, "model", f"non-finite-{key}")

    def poison(weights):
        weights[key].view(-1)[0] = value

    _edit_weights(directory / "model.safetensors", poison)
    return directory


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious ``pytorch_model.bin`` holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickled_weights(ws: Path) -> Path:
    directory = _copy(ws, "model", "pickled")
    (directory / "model.safetensors").unlink()
    marker = ws / "cases" / "PICKLE_RAN"
    with open(directory / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"model.embed_tokens.weight": _RunsCode(marker)}, handle)
    return directory


def _symlink(ws: Path, name: str, target: Path) -> Path:
    link = ws / "cases" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=True)
    return link


def config_text(ws: Path, text: str, name: str) -> Path:
    directory = _copy(ws, "model", name)
    (directory / "config.json").write_text(text)
    return directory


def config_edit(ws: Path, name: str, change) -> Path:
    directory = _copy(ws, "model", name)
    _edit_json(directory / "config.json", change)
    return directory


def corrupt_tokenizer(ws: Path) -> Path:
    directory = _copy(ws, "model", "bad-tokenizer")
    (directory / "tokenizer.json").write_text("{ this is not json")
    return directory


def lowrank_config_edit(ws: Path, name: str, change, source: str = "compressed") -> Path:
    directory = _copy(ws, source, name)
    _edit_json(directory / "lowrank_config.json", change)
    return directory


def first_module(data: dict) -> dict:
    return data["modules"][next(iter(data["modules"]))]


def missing_shard(ws: Path) -> Path:
    directory = _copy(ws, "compressed", "missing-shard")
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002-of-00002.safetensors"}}))
    return directory


def adapter_edit(ws: Path, name: str, config_change=None, weights_change=None) -> Path:
    directory = _copy(ws, "adapter", name)
    if config_change is not None:
        _edit_json(directory / "adapter_config.json", config_change)
    if weights_change is not None:
        _edit_weights(directory / "adapter_model.safetensors", weights_change)
    return directory


def adapter_weights(change):
    def apply(weights):
        key = next(key for key in weights if "lora_A" in key)
        change(weights, key)

    return apply


def partial_run(ws: Path, name: str, damage) -> Path:
    """An interrupted --blockwise run (one block of two done), then damaged."""
    from lowrank.blockwise import compress_blockwise

    out = ws / "cases" / name
    compress_blockwise(ws / "model", out, 0.4, method="svd", max_blocks=1, progress=False)
    damage(out.parent / f".{out.name}.partial")
    return out


def text_file(ws: Path, name: str, content: str) -> Path:
    path = ws / "cases" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


# --------------------------------------------------------------------------- the table


def cases(ws: Path) -> dict[str, tuple[list[str], str]]:
    """name → (argv, words the one error line must contain). Built lazily, one row at a time."""
    model, compressed, elastic, adapter, calib = (str(ws / name) for name in ("model", "compressed", "elastic", "adapter", "calib.txt"))
    new = str(ws / "new")
    svd = ["--method", "svd"]
    rows = {
        # ---- paths: inputs that are not there, outputs that would destroy or write into inputs
        "compress: missing model": lambda: (["compress", str(ws / "nope"), "-o", new, *svd], "does not exist"),
        "compress: model is a file": lambda: (["compress", str(ws / "a-file.txt"), "-o", new, *svd], "is a file"),
        "compress: directory without config": lambda: (["compress", str(ws / "existing"), "-o", new, *svd], "no config.json"),
        "compress: out is the model": lambda: (["compress", model, "-o", model, *svd, "--overwrite"], "is the input"),
        "compress: out contains the model": lambda: (["compress", model, "-o", str(ws), *svd, "--overwrite"], "contains the input"),
        "compress: out inside the model": lambda: (["compress", model, "-o", f"{model}/sub", *svd], "lies inside the input"),
        "compress: out is the calibration file": lambda: (["compress", model, "-o", calib, "--calib", calib, "--overwrite"], "is the input"),
        "compress: out is a file": lambda: (["compress", model, "-o", str(ws / "a-file.txt"), *svd, "--overwrite"], "is an existing file"),
        "compress: out under a file": lambda: (["compress", model, "-o", str(ws / "a-file.txt" / "x"), *svd], "which is a file"),
        "compress: out is the working directory": lambda: (["compress", model, "-o", ".", *svd, "--overwrite"], "current directory"),
        "compress: out is a symlink to the model": lambda: (["compress", model, "-o", str(_symlink(ws, "link-to-model", ws / "model")), *svd, "--overwrite"], "is the input"),
        "compress: model through a symlink, out the real one": lambda: (["compress", str(_symlink(ws, "model-link", ws / "model")), "-o", model, *svd, "--overwrite"], "is the input"),
        "compress: out exists": lambda: (["compress", model, "-o", str(ws / "existing"), *svd], "--overwrite"),
        "compress --blockwise: out is the model": lambda: (["compress", model, "-o", model, *svd, "--blockwise", "--overwrite"], "is the input"),
        "analyze: out is the model": lambda: (["analyze", model, "-o", model, "--overwrite"], "is the input"),
        "analyze: out contains the model": lambda: (["analyze", model, "-o", str(ws), "--overwrite"], "contains the input"),
        "diff: out is the tuned model": lambda: (["diff", model, compressed, "-o", compressed, "--overwrite"], "is the input"),
        "resize: out is the model": lambda: (["resize", elastic, "--ratio", "0.5", "-o", elastic, "--overwrite"], "is the input"),
        "pretrain: out is the model": lambda: (["pretrain", model, "--text", calib, "-o", model, "--overwrite", "--steps", "1"], "is the input"),
        "pretrain: out is the text": lambda: (["pretrain", model, "--text", calib, "-o", calib, "--overwrite", "--steps", "1"], "is the input"),
        "finetune: out is the model": lambda: (["finetune", model, "--data", calib, "-o", model, "--overwrite", "--steps", "1"], "is the input"),
        "merge-peft: out is the adapter": lambda: (["merge-peft", model, adapter, "-o", adapter, "--overwrite"], "is the input"),
        "merge-peft: out contains the model": lambda: (["merge-peft", model, adapter, "-o", str(ws), "--overwrite"], "contains the input"),
        "eval --json: the model's config.json": lambda: (["eval", model, "--no-speed", "--json", f"{model}/config.json"], "inside the input"),
        "eval --json: a directory": lambda: (["eval", model, "--no-speed", "--json", str(ws / "existing")], "is a directory"),
        "eval --json: missing parent": lambda: (["eval", model, "--no-speed", "--json", str(ws / "nodir" / "r.json")], "does not exist"),
        "eval --json: existing file": lambda: (["eval", model, "--no-speed", "--json", str(ws / "existing.json")], "--overwrite"),
        "eval: missing data file": lambda: (["eval", model, "--no-speed", "--data", str(ws / "nope.txt")], "does not exist"),
        "plan --json: inside the model": lambda: (["plan", model, "--json", f"{model}/plan.json"], "inside the input"),
        "merge-peft: missing adapter": lambda: (["merge-peft", model, str(ws / "nope"), "-o", new], "does not exist"),
        # ---- numbers
        "compress: ratio 1": lambda: (["compress", model, "-o", new, *svd, "--ratio", "1"], "--ratio must be in"),
        "compress: negative ratio": lambda: (["compress", model, "-o", new, *svd, "--ratio", "-0.1"], "--ratio must be in"),
        "compress: NaN ratio": lambda: (["compress", model, "-o", new, *svd, "--ratio", "nan"], "--ratio must be in"),
        "compress: ratio not a number": lambda: (["compress", model, "-o", new, *svd, "--ratio", "abc"], "--ratio"),
        "compress: batch size 0": lambda: (["compress", model, "-o", new, "--calib", calib, "--batch-size", "0"], "--batch-size must be a positive"),
        "compress: negative samples": lambda: (["compress", model, "-o", new, "--calib", calib, "--num-samples", "-1"], "--num-samples"),
        "compress: seq-len 0": lambda: (["compress", model, "-o", new, "--calib", calib, "--seq-len", "0"], "--seq-len"),
        "compress: unknown device": lambda: (["compress", model, "-o", new, *svd, "--device", "tpu9"], "not a device torch knows"),
        "compress: cuda without a GPU": lambda: (["compress", model, "-o", new, *svd, "--device", "cuda"], "no CUDA GPU"),
        "compress: unknown dtype": lambda: (["compress", model, "-o", new, *svd, "--dtype", "int8"], "--dtype must be"),
        "compress: unknown flag": lambda: (["compress", model, "-o", new, "--bogus"], "No such option"),
        "compress: missing out": lambda: (["compress", model], "--out"),
        "compress: unknown method": lambda: (["compress", model, "-o", new, "--method", "magic"], "unknown method"),
        "compress: unknown allocation": lambda: (["compress", model, "-o", new, *svd, "--allocate", "magic"], "unknown allocation"),
        "compress: option typo": lambda: (["compress", model, "-o", new, *svd, "--option", "precison=float32"], "bad --option"),
        "compress: option precision": lambda: (["compress", model, "-o", new, *svd, "--option", "precision=float46"], "precision must be"),
        "compress: option boolean typo": lambda: (["compress", model, "-o", new, "--method", "lowrank-sparse", "--option", "whiten=ture"], "true or false"),
        "compress: option out of range": lambda: (["compress", model, "-o", new, "--method", "lowrank-quant", "--option", "bits=99"], "bits must be"),
        "compress: option NaN": lambda: (["compress", model, "-o", new, "--calib", calib, "--option", "damp=nan"], "finite"),
        "compress: option version": lambda: (["compress", model, "-o", new, *svd, "--option", "version=7"], "bad --option"),
        "compress: invalid include regex": lambda: (["compress", model, "-o", new, *svd, "--include", "("], "not a valid regular expression"),
        "compress: invalid exclude regex": lambda: (["compress", model, "-o", new, *svd, "--exclude", "[a-"], "not a valid regular expression"),
        "compress: include matches nothing": lambda: (["compress", model, "-o", new, *svd, "--include", "nothing_like_this"], "matches no linear"),
        "compress: propagate without blockwise": lambda: (["compress", model, "-o", new, *svd, "--propagate", "compressed"], "--blockwise"),
        "compress: resume without blockwise": lambda: (["compress", model, "-o", new, *svd, "--resume"], "--blockwise"),
        "compress: blockwise with energy": lambda: (["compress", model, "-o", new, "--calib", calib, "--blockwise", "--allocate", "energy"], "--blockwise"),
        "compress: blockwise global, compressed propagation": lambda: (["compress", model, "-o", new, "--calib", calib, "--blockwise", "--allocate", "global", "--propagate", "compressed"], "--propagate dense"),
        "eval: seq-len 1": lambda: (["eval", model, "--no-speed", "--data", calib, "--seq-len", "1"], "--seq-len"),
        "eval: seq-len 0": lambda: (["eval", model, "--no-speed", "--data", calib, "--seq-len", "0"], "--seq-len"),
        "eval: negative max-windows": lambda: (["eval", model, "--no-speed", "--data", calib, "--max-windows", "-1"], "--max-windows"),
        "eval: batch size 0": lambda: (["eval", model, "--no-speed", "--data", calib, "--batch-size", "0"], "--batch-size"),
        "eval: unknown device": lambda: (["eval", model, "--no-speed", "--device", "gpu"], "not a device torch knows"),
        "analyze: reduction 1.5": lambda: (["analyze", model, "--reduction", "1.5"], "--reduction"),
        "analyze: aspect ratio NaN": lambda: (["analyze", model, "--aspect-ratio", "nan"], "--aspect-ratio"),
        "analyze: invalid regex": lambda: (["analyze", model, "--include", "*"], "not a valid regular expression"),
        "diff: threshold NaN": lambda: (["diff", model, compressed, "--threshold", "nan"], "--threshold"),
        "plan: ratio 2": lambda: (["plan", model, "--ratio", "2"], "--ratio must be in"),
        "plan: unknown strategy": lambda: (["plan", model, "--allocate", "magic"], "unknown allocation"),
        "plan: bad bit choices": lambda: (["plan", model, "--method", "lowrank-quant", "--option", "bit_choices=1,9"], "bit_choices must list"),
        "plan: bit choices, uniform": lambda: (
            ["plan", model, "--method", "lowrank-quant", "--option", "bit_choices=2,4", "--calib", calib, "--num-samples", "1", "--seq-len", "32"],
            "--allocate global",
        ),
        "resize: ratio 0": lambda: (["resize", elastic, "--ratio", "0", "-o", new], "--ratio must be in"),
        "resize: ratio above 1": lambda: (["resize", elastic, "--ratio", "1.2", "-o", new], "--ratio must be in"),
        "finetune: rank 0": lambda: (["finetune", model, "--data", calib, "-o", new, "--rank", "0"], "--rank"),
        "finetune: negative learning rate": lambda: (["finetune", model, "--data", calib, "-o", new, "--lr", "-1"], "--lr"),
        "finetune: unknown init": lambda: (["finetune", model, "--data", calib, "-o", new, "--init", "magic"], "unknown --init"),
        "pretrain: zero steps": lambda: (["pretrain", model, "--text", calib, "--steps", "0"], "steps"),
        # ---- text files
        "compress: missing calibration": lambda: (["compress", model, "-o", new, "--calib", str(ws / "nope.txt")], "does not exist"),
        "compress: empty calibration": lambda: (["compress", model, "-o", new, "--calib", str(text_file(ws, "empty.txt", ""))], "is empty"),
        "compress: blank calibration": lambda: (["compress", model, "-o", new, "--calib", str(text_file(ws, "blank.txt", " \n\t\n"))], "is empty"),
        "compress: short calibration": lambda: (["compress", model, "-o", new, "--calib", str(text_file(ws, "short.txt", "x = 1\n"))], "fewer than one window"),
        "compress: calibration is a directory": lambda: (["compress", model, "-o", new, "--calib", str(ws / "existing")], "is a directory"),
        "compress: no calibration for the default recipe": lambda: (["compress", model, "-o", new], "default recipe calibrates"),
        "compress: no calibration for whiten": lambda: (["compress", model, "-o", new, "--method", "whiten"], "needs calibration data"),
        "finetune: empty data": lambda: (["finetune", model, "--data", str(text_file(ws, "empty2.txt", "")), "-o", new], "is empty"),
        "pretrain: missing text": lambda: (["pretrain", model, "--text", str(ws / "nope.txt")], "does not exist"),
        # ---- checkpoints
        "compress: config not JSON": lambda: (["compress", str(config_text(ws, "{ nope", "bad-json")), "-o", new, *svd], "not valid JSON"),
        "compress: config a list": lambda: (["compress", str(config_text(ws, "[1, 2]", "json-list")), "-o", new, *svd], "JSON object"),
        "compress: config empty": lambda: (["compress", str(config_text(ws, "", "empty-config")), "-o", new, *svd], "not valid JSON"),
        "compress: no model_type": lambda: (["compress", str(config_edit(ws, "no-type", lambda c: c.pop("model_type"))), "-o", new, *svd], "no model_type"),
        "compress: unknown model_type": lambda: (["compress", str(config_edit(ws, "odd-type", lambda c: c.update(model_type="llama9"))), "-o", new, *svd], "does not know"),
        "compress: unknown architecture": lambda: (["compress", str(config_edit(ws, "odd-arch", lambda c: c.update(architectures=["Llama9"]))), "-o", new, *svd], "lacks"),
        "compress: architecture not covered by weights": lambda: (
            ["compress", str(config_edit(ws, "other-arch", lambda c: c.update(architectures=["LlamaForSequenceClassification"]))), "-o", new, *svd],
            "lacks",
        ),
        "compress: config value of the wrong type": lambda: (
            ["compress", str(config_edit(ws, "bad-value", lambda c: c.update(num_hidden_layers="two"))), "-o", new, *svd],
            "config",
        ),
        "compress: layer count beyond the weights": lambda: (
            ["compress", str(config_edit(ws, "more-layers", lambda c: c.update(num_hidden_layers=3))), "-o", new, *svd],
            "lacks",
        ),
        "compress: truncated weights": lambda: (["compress", str(truncated_weights(ws)), "-o", new, *svd], "could not load"),
        "compress: empty weights": lambda: (["compress", str(empty_weights(ws)), "-o", new, *svd], "could not load"),
        "compress: garbage weights": lambda: (["compress", str(garbage_weights(ws)), "-o", new, *svd], "could not load"),
        "compress: no weights": lambda: (["compress", str(no_weights(ws)), "-o", new, *svd], "could not load"),
        "compress: missing tensor": lambda: (["compress", str(missing_tensor(ws)), "-o", new, *svd], "up_proj"),
        "compress: tensor of the wrong shape": lambda: (["compress", str(wrong_shape(ws)), "-o", new, *svd], "could not load"),
        "compress: NaN in a norm": lambda: (
            ["compress", str(non_finite(ws, "model.layers.1.input_layernorm.weight", float("nan"))), "-o", new, *svd],
            "input_layernorm",
        ),
        "compress: Inf in the embedding": lambda: (["compress", str(non_finite(ws, "model.embed_tokens.weight", float("inf"))), "-o", new, *svd], "embed_tokens"),
        "compress: NaN in a targeted layer": lambda: (
            ["compress", str(non_finite(ws, "model.layers.0.self_attn.o_proj.weight", float("nan"))), "-o", new, *svd],
            "o_proj",
        ),
        "compress: pickle that runs code": lambda: (["compress", str(pickled_weights(ws)), "-o", new, *svd], "could not load"),
        "compress: corrupt tokenizer": lambda: (["compress", str(corrupt_tokenizer(ws)), "-o", new, "--calib", calib], "tokenizer"),
        "diff: tuned model with NaN": lambda: (["diff", model, str(non_finite(ws, "model.norm.weight", float("nan")))], "NaN"),
        "eval: truncated compressed weights": lambda: (["eval", str(truncated_weights(ws, "compressed")), "--no-speed"], "safetensors"),
        "eval: missing shard": lambda: (["eval", str(missing_shard(ws)), "--no-speed"], "lacks the weight file"),
        # ---- lowrank_config.json
        "eval: lowrank config not JSON": lambda: (["eval", str(_lowrank_text(ws, "{")), "--no-speed"], "not valid JSON"),
        "eval: format version 99": lambda: (["eval", str(lowrank_config_edit(ws, "v99", lambda d: d.update(format_version=99))), "--no-speed"], "upgrade lowrank"),
        "eval: method options of another version": lambda: (
            ["eval", str(lowrank_config_edit(ws, "config-version", lambda d: d["method_config"].update(version=9))), "--no-speed"],
            "do not read back",
        ),
        "eval: method option out of range": lambda: (
            ["eval", str(lowrank_config_edit(ws, "config-range", lambda d: d["method_config"].update(precision="float8"))), "--no-speed"],
            "do not read back",
        ),
        "eval: no modules": lambda: (["eval", str(lowrank_config_edit(ws, "no-modules", lambda d: d.pop("modules"))), "--no-speed"], "'modules'"),
        "eval: rank of 2**40": lambda: (["eval", str(lowrank_config_edit(ws, "huge-rank", lambda d: first_module(d).update(rank=2**40))), "--no-speed"], "does not match"),
        "eval: negative rank": lambda: (["eval", str(lowrank_config_edit(ws, "neg-rank", lambda d: first_module(d).update(rank=-3))), "--no-speed"], "lowrank_config"),
        "eval: wrong in_features": lambda: (
            ["eval", str(lowrank_config_edit(ws, "bad-in", lambda d: first_module(d).update(in_features=33))), "--no-speed"],
            "does not match",
        ),
        "eval: in_features a string": lambda: (
            ["eval", str(lowrank_config_edit(ws, "str-in", lambda d: first_module(d).update(in_features="32"))), "--no-speed"],
            "invalid entry",
        ),
        "eval: unknown structure": lambda: (["eval", str(lowrank_config_edit(ws, "odd-structure", lambda d: first_module(d).update(structure="Magic"))), "--no-speed"], "unknown module structure"),
        "eval: unknown layer": lambda: (
            ["eval", str(lowrank_config_edit(ws, "odd-layer", lambda d: d["modules"].update({"model.nowhere": first_module(d)}))), "--no-speed"],
            "lacks",
        ),
        "resize: a dense model": lambda: (["resize", model, "--ratio", "0.5", "-o", new], "dense model"),
        # ---- adapters
        "merge-peft: adapter config not JSON": lambda: (["merge-peft", model, str(_adapter_text(ws, "{")), "-o", new], "not valid JSON"),
        "merge-peft: not a LoRA": lambda: (["merge-peft", model, str(adapter_edit(ws, "ia3", lambda c: c.update(peft_type="IA3"))), "-o", new], "LORA"),
        "merge-peft: NaN alpha": lambda: (["merge-peft", model, str(adapter_edit(ws, "nan-alpha", lambda c: c.update(lora_alpha=float("nan")))), "-o", new], "lora_alpha"),
        "merge-peft: string alpha": lambda: (["merge-peft", model, str(adapter_edit(ws, "str-alpha", lambda c: c.update(lora_alpha="8"))), "-o", new], "lora_alpha"),
        "merge-peft: negative alpha": lambda: (["merge-peft", model, str(adapter_edit(ws, "neg-alpha", lambda c: c.update(lora_alpha=-4))), "-o", new], "lora_alpha"),
        "merge-peft: invalid alpha pattern": lambda: (
            ["merge-peft", model, str(adapter_edit(ws, "bad-pattern", lambda c: c.update(alpha_pattern={"(": 4}))), "-o", new],
            "regular expression",
        ),
        "merge-peft: NaN weights": lambda: (
            ["merge-peft", model, str(adapter_edit(ws, "nan-weights", weights_change=adapter_weights(lambda w, k: w[k].view(-1).__setitem__(0, float("nan"))))), "-o", new],
            "NaN",
        ),
        "merge-peft: factor of the wrong shape": lambda: (
            ["merge-peft", model, str(adapter_edit(ws, "bad-shape", weights_change=adapter_weights(lambda w, k: w.update({k: torch.zeros(2, 31)})))), "-o", new],
            "do not fit",
        ),
        "merge-peft: truncated weights": lambda: (["merge-peft", model, str(_adapter_truncated(ws)), "-o", new], "safetensors"),
        # ---- GGUF inputs (converted once into a cache; the file itself is an input like any other)
        "compress: corrupt gguf": lambda: (["compress", str(_gguf(ws, "corrupt")), "-o", new, *svd], "not a readable GGUF file"),
        "compress: out is the gguf": lambda: (["compress", str(_gguf(ws, "as-out")), "-o", str(_gguf(ws, "as-out")), *svd, "--overwrite"], "is the input"),
        "compress: out contains the gguf": lambda: (["compress", str(_gguf(ws, "inside")), "-o", str(_gguf(ws, "inside").parent), *svd, "--overwrite"], "contains the input"),
        "convert: corrupt gguf": lambda: (["convert", str(_gguf(ws, "convert")), new], "not a readable GGUF file"),
        "convert: out holds the gguf": lambda: (["convert", str(_gguf(ws, "convert-out")), str(_gguf(ws, "convert-out").parent), "--overwrite"], "input"),
        "eval --json: the gguf": lambda: (["eval", str(_gguf(ws, "json")), "--no-speed", "--json", str(_gguf(ws, "json")), "--overwrite"], "is the input"),
        "demo: ratio 1.5": lambda: (["demo", "--ratio", "1.5"], "--ratio"),
        "demo: out exists": lambda: (["demo", "--out", str(ws / "existing")], "--overwrite"),
        "demo: unknown model": lambda: (["demo", "--model", "gpt5"], "--model"),
        # ---- interrupted runs
        "compress --resume: damaged progress record": lambda: (
            ["compress", model, "-o", str(partial_run(ws, "damaged", lambda p: (p / "progress.json").write_text("{"))), *svd, "--blockwise", "--resume"],
            "damaged",
        ),
        "compress --resume: progress beyond the blocks": lambda: (
            ["compress", model, "-o", str(partial_run(ws, "beyond", lambda p: _edit_json(p / "progress.json", lambda s: s.update(done=9)))), *svd, "--blockwise", "--resume"],
            "damaged",
        ),
        "compress --resume: a recorded block missing": lambda: (
            ["compress", model, "-o", str(partial_run(ws, "lost-block", lambda p: (p / "block-00000.safetensors").unlink())), *svd, "--blockwise", "--resume"],
            "lacks files",
        ),
        "compress --blockwise: unfinished run without --resume": lambda: (
            ["compress", model, "-o", str(partial_run(ws, "unfinished", lambda p: None)), *svd, "--blockwise"],
            "unfinished",
        ),
    }
    return rows


def _gguf(ws: Path, name: str) -> Path:
    """A file with the .gguf suffix and random bytes (a truncated or corrupt download), in its own directory."""
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed (pip install -e '.[demo]')")
    path = ws / "cases" / f"gguf-{name}" / "model.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True)
        path.write_bytes(b"GGUF" + os.urandom(2000))
    return path


def _lowrank_text(ws: Path, text: str) -> Path:
    directory = _copy(ws, "compressed", "lowrank-text")
    (directory / "lowrank_config.json").write_text(text)
    return directory


def _adapter_text(ws: Path, text: str) -> Path:
    directory = _copy(ws, "adapter", "adapter-text")
    (directory / "adapter_config.json").write_text(text)
    return directory


def _adapter_truncated(ws: Path) -> Path:
    directory = _copy(ws, "adapter", "adapter-truncated")
    file = directory / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    return directory


def tree_hash(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` (hidden ones too) with a hash of its bytes."""
    result = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        result[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return result


CASE_NAMES = list(cases(Path("/nonexistent")))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_is_one_line_and_changes_nothing(case, workspace, capsys, monkeypatch):
    argv, words = cases(workspace)[case]()  # builds this row's hostile input
    monkeypatch.chdir(workspace / "work")
    capsys.readouterr()
    before = tree_hash(workspace)
    code = run(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code != 0, (case, captured.out[-500:])
    assert "Traceback" not in captured.err and "Traceback" not in captured.out, case
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, (case, lines)
    assert words in errors[0], (case, errors[0])
    assert tree_hash(workspace) == before, case
    assert not (workspace / "cases" / "PICKLE_RAN").exists()


def test_the_table_can_fail(workspace, capsys):
    """The checks above can tell a command that succeeds (and writes) from one that refuses."""
    before = tree_hash(workspace)
    out = workspace / "written"
    assert run(["compress", str(workspace / "model"), "-o", str(out), "--method", "svd"]) == 0
    assert tree_hash(workspace) != before and out.is_dir()
    shutil.rmtree(out)


# --------------------------------------------------------------------------- foreign code


HOSTILE_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("yes")  # transformers runs a copy of this file from its module cache
from transformers import LlamaConfig, LlamaForCausalLM


class HostileConfig(LlamaConfig):
    model_type = "{model_type}"


class HostileModel(LlamaForCausalLM):
    config_class = HostileConfig
"""


def _with_code(ws: Path, name: str, model_type: str) -> Path:
    directory = _copy(ws, "model", name)
    (directory / "modeling_hostile.py").write_text(HOSTILE_CODE.format(model_type=model_type, marker=str(directory / "CODE_RAN")))

    def add(config):
        config.update(model_type=model_type, auto_map={"AutoConfig": "modeling_hostile.HostileConfig", "AutoModelForCausalLM": "modeling_hostile.HostileModel"})

    _edit_json(directory / "config.json", add)
    return directory


def test_shipped_code_is_refused_without_trust_and_never_prompts(workspace, capsys, monkeypatch):
    directory = _with_code(workspace, "shipped-code", "hostile-llama")
    monkeypatch.setattr("sys.stdin", None)  # a prompt would fail here rather than wait
    for command in (["compress", str(directory), "-o", str(workspace / "new"), "--method", "svd"], ["eval", str(directory), "--no-speed"],
                    ["analyze", str(directory)], ["plan", str(directory)]):  # fmt: skip
        assert run(command) == 2, command
        err = capsys.readouterr().err
        assert "--trust-remote-code" in err and len(err.strip().splitlines()) == 1, err
        assert not (directory / "CODE_RAN").exists(), command


def test_known_model_type_uses_transformers_code_not_the_directory(workspace, capsys):
    directory = _with_code(workspace, "shipped-known", "llama")
    assert run(["analyze", str(directory)]) == 0, capsys.readouterr().err
    assert not (directory / "CODE_RAN").exists()


def test_trust_remote_code_runs_it_when_asked(workspace, capsys, tmp_path):
    directory = _with_code(workspace, "shipped-trusted", "hostile-llama-trusted")
    assert run(["analyze", str(directory), "--trust-remote-code"]) == 0, capsys.readouterr().err
    assert (directory / "CODE_RAN").read_text() == "yes"


# --------------------------------------------------------------------------- interrupted runs


def test_stale_temporaries_of_dead_runs_are_removed(workspace, capsys):
    out = workspace / "cases" / "stale-out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = out.parent / f".{out.name}.tmp-{dead}"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    assert run(["compress", str(workspace / "model"), "-o", str(out), "--method", "svd"]) == 0, capsys.readouterr().err
    assert not stale.exists() and (out / "lowrank_config.json").is_file()


@pytest.mark.slow
def test_terminate_during_compress_removes_its_temporary_output(workspace):
    """SIGTERM (what a scheduler or `kill` sends) unwinds the run: no temporary directory is left behind."""
    out = workspace / "cases" / "terminated"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", "from lowrank.cli.main import main; main()", "compress", str(workspace / "model"), "-o", str(out),
               "--calib", str(workspace / "calib.txt"), "--num-samples", "1024", "--seq-len", "128", "--batch-size", "1"]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = b""
    while b"calibrat" not in seen.lower() and process.poll() is None:  # lowrank runs (its progress bar is up)
        seen += process.stderr.read1(4096)
    process.terminate()
    process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, seen[-2000:]
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


@pytest.mark.slow
def test_kill_during_compress_leaves_no_output_and_the_input_intact(workspace):
    """kill -9 at several moments of a compress run: never a partial --out, never a changed input."""
    model = workspace / "model"
    before = tree_hash(model)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    out = workspace / "cases" / "killed"
    command = [sys.executable, "-c", "from lowrank.cli.main import main; main()", "compress", str(model), "-o", str(out), "--calib", str(workspace / "calib.txt"),
               "--num-samples", "64", "--seq-len", "128", "--batch-size", "1", "--overwrite"]  # fmt: skip
    for delay in (1.0, 3.0, 5.0):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.kill()
        process.wait()
        assert not out.exists() or (out / "lowrank_config.json").is_file(), delay  # absent, or the finished output
        assert tree_hash(model) == before
    shutil.rmtree(out, ignore_errors=True)
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert (out / "lowrank_config.json").is_file()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))  # the killed runs' leftovers are gone
