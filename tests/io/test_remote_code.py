"""A saved directory loads with plain transformers (``trust_remote_code=True``) where lowrank cannot be imported.

Every structure is saved for a decoder (tiny Llama, and the reference model when ../shared is there),
an encoder (tiny BERT) and mixtures of experts (tiny Mixtral and GPT-OSS, experts unfused); one
subprocess whose interpreter cannot import lowrank loads them all with every Auto class in their
``auto_map`` (``AutoModelForCausalLM``, ``AutoModel``) and writes their outputs, which must equal
those of ``lowrank.load``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import save_file

import lowrank
from architectures import BY_NAME, GQA, Architecture
from lowrank.allocation import elastic_plan
from lowrank.io.remote_code import CONFIG_KEY, MODELING_FILE, modeling_source, write_remote_code
from lowrank.methods.lowrank_quant import LowRankQuantConfig
from lowrank.nn import STRUCTURES
from shared_data import FIXTURE

# (name, family, method, method config, dtype): every structure in a decoder, an encoder and a mixture
# of experts; the quantized residual outside the int4 kernel (group size 24) and in two 4-bit planes
# (6 bits); a bfloat16 model (its float16 scales and integer buffers must keep their dtypes); the
# quantized residual with sparse outliers (LowRankQuantSparseLinear).
CASES = [
    ("llama-svd", "llama", "svd", None, torch.float32),
    ("llama-lowrank-sparse", "llama", "lowrank-sparse", None, torch.float32),
    ("llama-dictionary", "llama", "dictionary", None, torch.float32),
    ("llama-lowrank-quant", "llama", "lowrank-quant", None, torch.float32),
    ("llama-lowrank-quant-6bit-group24", "llama", "lowrank-quant", LowRankQuantConfig(bits=6, group_size=24), torch.float32),
    ("llama-lowrank-quant-bfloat16", "llama", "lowrank-quant", None, torch.bfloat16),
    ("llama-lowrank-quant-outliers", "llama", "lowrank-quant", LowRankQuantConfig(outliers=0.01), torch.float32),
    ("bert-whiten", "bert", "whiten", None, torch.float32),
    ("bert-lowrank-sparse", "bert", "lowrank-sparse", None, torch.float32),
    ("bert-dictionary", "bert", "dictionary", None, torch.float32),
    ("bert-lowrank-quant", "bert", "lowrank-quant", None, torch.float32),
    ("mixtral-lowrank-sparse", "mixtral", "lowrank-sparse", None, torch.float32),
    ("gpt_oss-svd", "gpt_oss", "svd", None, torch.float32),
]
# Experts stored transposed, with biases and a clamped gate: the other fused layout transformers has.
GPT_OSS = Architecture(
    "gpt_oss", transformers.GptOssConfig, dict(GQA, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=8)
)
FAMILIES = {**BY_NAME, "gpt_oss": GPT_OSS}
RESIZED_CASE = "llama-elastic-resized"  # saved by lowrank.load(elastic, ratio=...): its config.json came from another size
FIXTURE_CASE = "pycode-llama-whiten"
BLOCKWISE_CASE = "llama-blockwise"  # written by compress_blockwise, not lowrank.save
# lowrank.compensate with quantized factors (QuantizedCorrectionLinear): its base's group size (32: the
# int4 kernel; 16: dequantized), model dtype, factor bits and factor group size (24: a short last group).
COMPENSATE_CASES = {
    "llama-compensate-factor-bits": (32, torch.float32, 4, 24),
    "llama-compensate-factor-bits-bfloat16": (16, torch.bfloat16, 5, 8),
}
PROMPT_LENGTH, NEW_TOKENS = 12, 8

# Run in a fresh interpreter: loads every directory named on the command line with every Auto class in
# its auto_map, and saves {directory: {Auto class: outputs}} plus what transformers reported.
REMOTE_LOADER = """
import sys
sys.modules["lowrank"] = None  # from here on `import lowrank` raises ImportError: only the directory's own code can run
import json, torch, transformers
try:
    import lowrank
    raise SystemExit("lowrank is importable in the remote interpreter")
except ImportError:
    pass
torch.set_num_threads(1)
results, info = {}, {}
for directory in sys.argv[2:]:
    results[directory], info[directory] = {}, {}
    for auto_name in sorted(json.load(open(directory + "/config.json"))["auto_map"]):
        model, loading = getattr(transformers, auto_name).from_pretrained(directory, trust_remote_code=True, output_loading_info=True)
        model.eval()
        input_ids = torch.randint(0, model.config.vocab_size, (2, %(length)d), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            output = model(input_ids=input_ids)
            result = {"input_ids": input_ids, "output": output.logits if hasattr(output, "logits") else output.last_hidden_state}
            if hasattr(model, "generate"):
                result["generated"] = model.generate(input_ids[:1], max_new_tokens=%(new)d, do_sample=False)
        results[directory][auto_name] = result
        info[directory][auto_name] = {
            "class": type(model).__name__,
            "base": type(model).__mro__[1].__name__,
            "dtype": str(next(model.parameters()).dtype),
            "loading": {key: sorted(map(str, value)) for key, value in loading.items()},
        }
    info[directory]["lowrank_modules"] = sorted(name for name in sys.modules if name.split(".")[0] == "lowrank" and sys.modules[name] is not None)
torch.save(results, sys.argv[1] + ".pt")
json.dump(info, open(sys.argv[1] + ".json", "w"))
""" % {"length": PROMPT_LENGTH, "new": NEW_TOKENS}


def compress_and_save(model, batches, method: str, config, directory, tokenizer=None) -> None:
    stats = lowrank.collect_statistics(model, batches, lowrank.find_targets(model), progress=False)
    plan = lowrank.allocate(model, 0.3, method=method, stats=stats)
    report = lowrank.compress_(model, plan, method=method, stats=stats, config=config, progress=False)
    lowrank.save(model, directory, report=report, tokenizer=tokenizer)


def run_without_lowrank(directories, out, hf_home) -> subprocess.CompletedProcess:
    """The loader above in a new interpreter, offline, with its own module cache for the remote code."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run(
        [sys.executable, "-c", REMOTE_LOADER, str(out), *map(str, directories)], env=environment, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on two busy cores: a second OpenMP thread only spin-waits (4 ms per call instead of 0.1 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """Saved directories for every case, loaded once in the lowrank-free subprocess: (directories, outputs, info)."""
    root = tmp_path_factory.mktemp("remote")
    directories = {}
    for name, family, method, config, dtype in CASES:
        architecture = FAMILIES[family]
        generator = torch.Generator().manual_seed(0)
        batches = [architecture.make_batch(generator) for _ in range(2)]
        compress_and_save(architecture.build().to(dtype), batches, method, config, root / name)
        directories[name] = root / name
    model = BY_NAME["llama"].build()
    report = lowrank.compress_(model, elastic_plan(model, method="svd"), method="svd", progress=False)
    lowrank.save(model, root / "elastic", report=report)
    resized, resized_report = lowrank.load(root / "elastic", ratio=0.5, return_report=True)
    lowrank.save(resized, root / RESIZED_CASE, report=resized_report)
    directories[RESIZED_CASE] = root / RESIZED_CASE
    from lowrank.blockwise import compress_blockwise

    BY_NAME["llama"].build().save_pretrained(root / "dense-llama")
    compress_blockwise(root / "dense-llama", root / BLOCKWISE_CASE, 0.4, method="svd", progress=False)
    directories[BLOCKWISE_CASE] = root / BLOCKWISE_CASE
    from lowrank.compensate import CompensateConfig, compensate_

    for name, (group_size, dtype, factor_bits, factor_group_size) in COMPENSATE_CASES.items():
        model = BY_NAME["llama"].build().to(dtype)
        batches = [BY_NAME["llama"].make_batch(torch.Generator().manual_seed(0))]
        stats = lowrank.collect_statistics(model, batches, lowrank.find_targets(model), progress=False)
        config = CompensateConfig(base="rtn:3", group_size=group_size, factor_bits=factor_bits, factor_group_size=factor_group_size)
        report = compensate_(model, stats, config, rank=3, progress=False)
        lowrank.save(model, root / name, report=report)
        directories[name] = root / name
    if FIXTURE.is_dir():
        from lowrank.models import load_pretrained, load_tokenizer

        model, tokenizer = load_pretrained(FIXTURE), load_tokenizer(FIXTURE)
        generator = torch.Generator().manual_seed(0)
        batches = [{"input_ids": torch.randint(0, model.config.vocab_size, (4, 64), generator=generator)} for _ in range(2)]
        compress_and_save(model, batches, "whiten", None, root / FIXTURE_CASE, tokenizer=tokenizer)
        directories[FIXTURE_CASE] = root / FIXTURE_CASE
    result = run_without_lowrank(directories.values(), root / "results", root / "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = torch.load(root / "results.pt")
    info = json.loads((root / "results.json").read_text())
    by_name = lambda results: {name: results[str(path)] for name, path in directories.items()}  # noqa: E731
    return directories, by_name(outputs), by_name(info)


def check_same_outputs(name, remote) -> None:
    """Every Auto class in the directory's auto_map built the saved structures and computes what lowrank.load's model does."""
    directories, outputs, info = remote
    loaded = lowrank.load(directories[name])
    saved = json.loads((directories[name] / "lowrank_config.json").read_text())
    config = json.loads((directories[name] / "config.json").read_text())
    # The remote classes build from this: every compressed layer with its structure, every unfused experts block.
    assert {layer: spec["structure"] for layer, spec in config[CONFIG_KEY]["layers"].items()} == {
        layer: spec["structure"] for layer, spec in saved["modules"].items()
    }
    assert config[CONFIG_KEY]["unfused_experts"] == saved.get("unfused_experts", [])
    assert info[name].pop("lowrank_modules") == []
    assert set(outputs[name]) == set(info[name]) == set(config["auto_map"])
    for auto_name, result in outputs[name].items():
        reference = loaded if auto_name != "AutoModel" else loaded.base_model  # AutoModel: the model without its head
        head = {key for key in loaded.state_dict() if reference is not loaded and not key.startswith(loaded.base_model_prefix + ".")}
        loading = info[name][auto_name]["loading"]
        assert set(loading.pop("unexpected_keys")) <= head  # a base model leaves the head's weights unread, nothing else
        assert loading == {"missing_keys": [], "mismatched_keys": [], "error_msgs": []}
        assert info[name][auto_name]["class"] == config["auto_map"][auto_name].split(".")[1]
        assert info[name][auto_name]["base"] == type(reference).__name__
        assert info[name][auto_name]["dtype"] == str(next(loaded.parameters()).dtype)
        with torch.no_grad():
            output = reference(input_ids=result["input_ids"])
        expected = output.logits if hasattr(output, "logits") else output.last_hidden_state
        torch.testing.assert_close(result["output"], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        if "generated" in result:
            with torch.no_grad():
                generated = loaded.generate(result["input_ids"][:1], max_new_tokens=NEW_TOKENS, do_sample=False)
            assert torch.equal(result["generated"], generated)


@pytest.mark.parametrize("name", [case[0] for case in CASES])
def test_trust_remote_code_load_without_lowrank_gives_the_same_outputs(remote, name):
    check_same_outputs(name, remote)


def test_outliers_case_saves_quantized_layers_with_sparse_outliers(remote):
    """The outliers case above exercises LowRankQuantSparseLinear in the remote interpreter, not a fallback structure."""
    layers = json.loads((remote[0]["llama-lowrank-quant-outliers"] / "config.json").read_text())[CONFIG_KEY]["layers"]
    quant_sparse = [spec for spec in layers.values() if spec["structure"] == "LowRankQuantSparseLinear"]
    assert quant_sparse and all(spec["num_nonzero"] > 0 for spec in quant_sparse)


def test_resized_model_gets_remote_code_for_its_own_ranks(remote):
    check_same_outputs(RESIZED_CASE, remote)
    elastic = json.loads((remote[0][RESIZED_CASE].parent / "elastic" / "config.json").read_text())[CONFIG_KEY]["layers"]
    resized = json.loads((remote[0][RESIZED_CASE] / "config.json").read_text())[CONFIG_KEY]["layers"]
    assert all(resized[name]["rank"] <= elastic[name]["rank"] for name in elastic)
    assert sum(spec["rank"] for spec in resized.values()) < sum(spec["rank"] for spec in elastic.values())


def test_blockwise_output_loads_without_lowrank(remote):
    check_same_outputs(BLOCKWISE_CASE, remote)


@pytest.mark.parametrize("name", COMPENSATE_CASES)
def test_compensated_model_with_quantized_factors_loads_without_lowrank(remote, name):
    layers = json.loads((remote[0][name] / "config.json").read_text())[CONFIG_KEY]["layers"]
    assert layers and {spec["structure"] for spec in layers.values()} == {"QuantizedCorrectionLinear"}
    check_same_outputs(name, remote)


def test_reference_model_loads_and_generates_without_lowrank(remote):
    if FIXTURE_CASE not in remote[0]:
        pytest.skip(f"reference model not found at {FIXTURE}")
    check_same_outputs(FIXTURE_CASE, remote)
    assert (remote[0][FIXTURE_CASE] / "tokenizer.json").is_file()


def test_auto_map_names_the_auto_classes_of_the_base_architecture(remote):
    directories = remote[0]
    for name, family, *_ in CASES:
        config = json.loads((directories[name] / "config.json").read_text())
        if family == "bert":
            expected = {"AutoModel": "modeling_lowrank.LowRankModel"}
        else:
            expected = {"AutoModel": "modeling_lowrank.LowRankBaseModel", "AutoModelForCausalLM": "modeling_lowrank.LowRankModel"}
        assert config["auto_map"] == expected
        assert config["model_type"] == family and (directories[name] / MODELING_FILE).is_file()


def test_lowrank_load_never_executes_the_modeling_file(tmp_path):
    model = BY_NAME["llama"].build()
    compress_and_save(model, [BY_NAME["llama"].make_batch(torch.Generator().manual_seed(0))], "svd", None, tmp_path / "out")
    modeling = tmp_path / "out" / MODELING_FILE
    modeling.write_text(modeling.read_text() + "\nraise RuntimeError('modeling_lowrank.py was executed')\n")
    x = torch.randint(0, 100, (1, 8))
    for trust_remote_code in (False, True):  # lowrank builds its own outputs from its own code, trusted or not
        with torch.no_grad():
            assert torch.equal(lowrank.load(tmp_path / "out", trust_remote_code=trust_remote_code)(x).logits, model(x).logits)


def test_stale_remote_code_entries_are_replaced_or_removed(tmp_path, caplog):
    """A config carried over from a loaded model names other layers: rewritten when supported, dropped with a note when not."""
    save_file({"model.layers.0.mlp.up_proj.down.weight": torch.zeros(2, 4)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "auto_map": {"AutoModelForCausalLM": "modeling_lowrank.LowRankModel", "AutoTokenizer": ["tok.Fast", None]},
                CONFIG_KEY: {"layers": {"model.layers.9.mlp.up_proj": {"structure": "LowRankLinear"}}},
            }
        )
    )
    layer = {"structure": "LowRankLinear", "in_features": 4, "out_features": 6, "bias": False, "rank": 2, "error": 0.1}
    assert write_remote_code(tmp_path, {"modules": {"model.layers.0.mlp.up_proj": layer}})
    config = json.loads((tmp_path / "config.json").read_text())
    saved_layer = {key: value for key, value in layer.items() if key != "error"}
    assert config[CONFIG_KEY] == {"unfused_experts": [], "layers": {"model.layers.0.mlp.up_proj": saved_layer}}
    assert config["auto_map"] == {
        "AutoModel": "modeling_lowrank.LowRankBaseModel",
        "AutoModelForCausalLM": "modeling_lowrank.LowRankModel",
        "AutoTokenizer": ["tok.Fast", None],
    }

    with caplog.at_level(logging.INFO, logger="lowrank.io.remote_code"):
        assert not write_remote_code(tmp_path, {"modules": {"model.layers.0.mlp.up_proj": {**layer, "structure": "FutureLinear"}}})
    assert "does not implement FutureLinear" in caplog.text
    config = json.loads((tmp_path / "config.json").read_text())
    assert CONFIG_KEY not in config and config["auto_map"] == {"AutoTokenizer": ["tok.Fast", None]}
    assert not (tmp_path / MODELING_FILE).exists()


def test_dense_save_writes_no_remote_code(tmp_path):
    lowrank.save(BY_NAME["llama"].build(), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in config and not (tmp_path / "out" / MODELING_FILE).exists()


# Shapes that exercise every stored layout: biases or not, int32 indices past 32768 inputs or atoms,
# packed codes whose count is not a multiple of 8, a last group shorter than the others.
LAYOUTS = [
    ("LowRankLinear", 6, 5, True, {"rank": 2}),
    ("LowRankLinear", 6, 5, False, {"rank": 3}),
    ("LowRankPlusSparseLinear", 6, 5, True, {"rank": 2, "num_nonzero": 7}),
    ("LowRankPlusSparseLinear", 40000, 2, False, {"rank": 1, "num_nonzero": 3}),
    ("DictionaryLinear", 6, 5, True, {"num_atoms": 4, "nonzeros": 2}),
    ("DictionaryLinear", 2, 3, False, {"num_atoms": 40000, "nonzeros": 2}),
    ("LowRankQuantLinear", 70, 5, True, {"rank": 2, "bits": 3, "group_size": 32}),
    ("LowRankQuantLinear", 64, 3, False, {"rank": 1, "bits": 8, "group_size": 64}),
    ("LowRankQuantLinear", 30, 7, False, {"rank": 2, "bits": 5, "group_size": 24}),
    ("LowRankQuantSparseLinear", 70, 5, True, {"rank": 2, "bits": 3, "group_size": 32, "num_nonzero": 4}),
    ("LowRankQuantSparseLinear", 40000, 2, False, {"rank": 1, "bits": 4, "group_size": 64, "num_nonzero": 3}),
    ("QuantizedCorrectionLinear", 70, 5, True, {"rank": 3, "bits": 3, "group_size": 32, "factor_bits": 4, "factor_group_size": 16}),
    ("QuantizedCorrectionLinear", 64, 9, False, {"rank": 2, "bits": 6, "group_size": 64, "factor_bits": 5, "factor_group_size": 24}),
    ("HeadPaddedLinear", 6, 12, True, {"heads": 3, "head_dim": 4, "kept": 3}),
    ("HeadPaddedLinear", 6, 8, False, {"heads": 2, "head_dim": 4, "kept": 4}),
    ("HeadSlicedLinear", 12, 5, True, {"heads": 3, "head_dim": 4, "kept": 1}),
    ("HeadSlicedLinear", 8, 5, False, {"heads": 2, "head_dim": 4, "kept": 2}),
    ("HeadScatteredLinear", 6, 16, True, {"heads": 2, "head_dim": 8, "kept": 6}),
    ("HeadScatteredLinear", 6, 16, False, {"heads": 4, "head_dim": 4, "kept": 2}),
]


@pytest.mark.parametrize("structure, in_features, out_features, bias, spec", LAYOUTS)
def test_remote_modules_have_the_saved_state_dict_layout(tmp_path, structure, in_features, out_features, bias, spec):
    """Names, shapes and dtypes of the modeling file's modules equal those of lowrank.nn's, which transformers then fills."""
    (tmp_path / MODELING_FILE).write_text(modeling_source("LlamaForCausalLM", "LlamaModel"))
    module_spec = importlib.util.spec_from_file_location("modeling_lowrank_under_test", tmp_path / MODELING_FILE)
    modeling = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(modeling)
    layout = lambda module: {key: (tuple(value.shape), value.dtype) for key, value in module.state_dict().items()}  # noqa: E731
    expected = STRUCTURES[structure].empty(in_features, out_features, bias, spec)
    assert layout(modeling.STRUCTURES[structure](in_features, out_features, bias, **spec)) == layout(expected)
