"""MoDeGPT types II and III (head-resized q/k/v/o layers) load with plain transformers (``trust_remote_code=True``).

The modeling file's ``HeadPaddedLinear``, ``HeadSlicedLinear`` and ``HeadScatteredLinear``, filled
with the state dict of lowrank's layer of the same name, compute the layer's dense weight (its
``to_dense()``, zeros where heads were shrunk) times the input; and a tiny Llama compressed by
``modegpt`` with ``attention="all"`` (every v/o and q/k pair shrunk, heads of different sizes per
layer) saved by :func:`lowrank.save` loads in an interpreter that cannot import lowrank with the
logits and greedy tokens of :func:`lowrank.load`'s model.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from tiny_models import calibrated_tiny, tiny_model, token_batches

import lowrank
from lowrank.io.remote_code import MODELING_FILE, modeling_source
from lowrank.methods.modegpt import ModegptConfig, compress_modegpt_
from lowrank.nn.head_resized_linear import HeadPaddedLinear, HeadScatteredLinear, HeadSlicedLinear, HeadWeight

NEW_TOKENS = 4
HEAD_CLASSES = {"HeadPaddedLinear", "HeadSlicedLinear", "HeadScatteredLinear"}

# Loads the directory with AutoModelForCausalLM in a fresh interpreter where `import lowrank` fails, and
# saves its logits, greedy tokens (with a KV cache), loading report and the classes of its attention layers.
REMOTE_LOADER = """
import sys
sys.modules["lowrank"] = None  # only the directory's own code can run
import json, torch, transformers
torch.set_num_threads(1)
model, loading = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, output_loading_info=True)
model.eval()
input_ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(input_ids=input_ids).logits
    generated = model.generate(input_ids[:1, :8], max_new_tokens=int(sys.argv[4]), do_sample=False)
torch.save({"logits": logits, "generated": generated}, sys.argv[3] + ".pt")
layers = {name: type(module).__name__ for name, module in model.named_modules() if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))}
json.dump({"loading": {key: sorted(map(str, value)) for key, value in loading.items()}, "layers": layers,
           "lowrank_modules": sorted(name for name in sys.modules if name.split(".")[0] == "lowrank" and sys.modules[name] is not None)},
          open(sys.argv[3] + ".json", "w"))
"""


def remote_module(directory):
    """The modeling file lowrank writes, written to ``directory`` and imported here (as transformers would import it)."""
    (directory / MODELING_FILE).write_text(modeling_source("LlamaForCausalLM", "LlamaModel"))
    spec = importlib.util.spec_from_file_location("modeling_lowrank_head_layers", directory / MODELING_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def head_layers(generator: torch.Generator):
    """lowrank's three head layers with random weights and biases: (layer, bias of its dense equivalent)."""
    heads, head_dim, kept, hidden = 3, 8, 5, 12
    padded = HeadPaddedLinear.from_factors(
        HeadWeight(torch.randn(heads * kept, hidden, generator=generator), heads, head_dim),
        torch.randn(heads * kept, generator=generator),
        torch.float32,
    )
    sliced = HeadSlicedLinear.from_factors(
        HeadWeight(torch.randn(hidden, heads * kept, generator=generator), heads, head_dim), torch.randn(hidden, generator=generator), torch.float32
    )
    dims = torch.stack([torch.randperm(head_dim, generator=generator)[:kept].sort().values for _ in range(heads)])
    scattered = HeadScatteredLinear.from_factors(
        HeadWeight(torch.randn(heads * kept, hidden, generator=generator), heads, head_dim, dims),
        torch.randn(heads * kept, generator=generator),
        torch.float32,
    )
    padded_bias = torch.zeros(heads, head_dim)
    padded_bias[:, :kept] = padded.bias.detach().view(heads, kept)
    scattered_bias = torch.zeros(heads * head_dim)
    scattered_bias[scattered.kept_mask.flatten()] = scattered.bias.detach()
    return [(padded, padded_bias.flatten()), (sliced, sliced.bias.detach()), (scattered, scattered_bias)]


def test_remote_head_layers_compute_the_dense_weight_of_the_saved_tensors(tmp_path):
    """Loaded strictly from lowrank's state dict, each remote module gives x·Wᵀ + b with W lowrank's ``to_dense()``
    (zero rows or columns where heads were shrunk), and exactly lowrank's module's output."""
    modeling = remote_module(tmp_path)
    generator = torch.Generator().manual_seed(0)
    for layer, dense_bias in head_layers(generator):
        name = type(layer).__name__
        remote = modeling.STRUCTURES[name](layer.in_features, layer.out_features, layer.bias is not None, **layer.spec())
        remote.load_state_dict(layer.state_dict(), strict=True)
        x = torch.randn(2, 7, layer.in_features, generator=generator)
        with torch.no_grad():
            output = remote(x)
            expected = x.double() @ layer.to_dense().double().T + dense_bias.double()
            torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-5, msg=name)
            assert torch.equal(output, layer(x)), name
        assert remote.weight is None  # like lowrank's: model code that reads .weight skips that step


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama with every attention pair and MLP shrunk by modegpt (II + III), saved: (model, directory)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, stats = calibrated_tiny("llama")
        model = tiny_model("llama")
        config = ModegptConfig(attention="all", factored="fisher-whiten", fallback=False)
        plan = lowrank.allocate(model, 0.3, method="modegpt", stats=stats, strategy="uniform", strategy_config=config)
        details = plan.details["modegpt"]
        # Different sizes per layer, so each layer's own spec must be read: q/k keep 1 and 3 rotary pairs, v/o 3 and 6 dimensions.
        for entry, pairs in zip(details["query_key"].values(), (1, 3)):
            entry.update(pairs=pairs, head_dim=2 * pairs)
            plan.ranks.update(dict.fromkeys(entry["members"], 2 * pairs))
        for entry, kept in zip(details["attention"].values(), (3, 6)):
            entry["head_dim"] = kept
            plan.ranks.update(dict.fromkeys(entry["members"], kept))
        report = compress_modegpt_(model, plan, stats, config, progress=False)
        directory = tmp_path_factory.mktemp("remote-heads") / "saved"
        lowrank.save(model, directory, report=report)
    finally:
        torch.set_num_threads(threads)
    return model, directory


def test_modegpt_types_two_and_three_load_with_trust_remote_code(saved, tmp_path):
    model, directory = saved
    config = json.loads((directory / "config.json").read_text())
    layers = config["lowrank"]["layers"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lowrank.LowRankModel" and (directory / MODELING_FILE).is_file()
    attention = model.model.layers[0].self_attn
    assert (
        attention.q_proj.kept,
        attention.v_proj.kept,
        model.model.layers[1].self_attn.k_proj.kept,
        model.model.layers[1].self_attn.o_proj.kept,
    ) == (2, 3, 6, 6)
    assert {spec["structure"] for name, spec in layers.items() if ".self_attn." in name} == HEAD_CLASSES
    assert layers["model.layers.1.self_attn.o_proj"] == {
        "structure": "HeadSlicedLinear", "in_features": 32, "out_features": 32, "bias": False, "heads": 4, "head_dim": 8, "kept": 6,
    }  # fmt: skip

    input_ids = token_batches(1, seed=5)[0]["input_ids"]
    torch.save(input_ids, tmp_path / "input_ids.pt")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOADER, str(directory), str(tmp_path / "input_ids.pt"), str(tmp_path / "remote"), str(NEW_TOKENS)],
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "remote.pt")
    info = json.loads((tmp_path / "remote.json").read_text())
    assert info["lowrank_modules"] == []
    assert info["loading"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert info["layers"] == {name: spec["structure"] for name, spec in layers.items() if ".self_attn." in name}

    loaded = lowrank.load(directory)
    with torch.no_grad():
        expected = loaded(input_ids=input_ids).logits
        assert torch.equal(expected, model(input_ids=input_ids).logits)
        generated = loaded.generate(input_ids[:1, :8], max_new_tokens=NEW_TOKENS, do_sample=False)
    torch.testing.assert_close(remote["logits"], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert torch.equal(remote["generated"], generated)
