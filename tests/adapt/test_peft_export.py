"""PEFT interchange, checked with the real ``peft`` package: both export paths and the import."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_model

import lowrank
from lowrank.adapt import (
    CovarianceConfig,
    MinorConfig,
    PrincipalConfig,
    RandomConfig,
    SingularValueConfig,
    adapter_layers,
    export_peft,
    import_peft,
    save_residual_base,
)
from lowrank.errors import LowrankError
from lowrank.models import load_pretrained

CONFIGS = [
    ("principal", PrincipalConfig(rank=4)),
    ("minor", MinorConfig(rank=4)),
    ("covariance-knowledge", CovarianceConfig(rank=4, mode="knowledge")),
    ("singular-value", SingularValueConfig(rank=4, update_rank=2)),
    ("random", RandomConfig(rank=4)),
]


def peft_logits(base: torch.nn.Module, adapter_dir, ids: torch.Tensor) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir))
    with torch.no_grad():
        return model(input_ids=ids).logits


def save_quietly(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return function(*args, **kwargs)


@pytest.mark.parametrize("name,config", CONFIGS, ids=[row[0] for row in CONFIGS])
def test_peft_loads_both_exports_with_the_same_logits(name, config, tmp_path, sample_ids, tiny_stats, adapt_quietly, perturb_adapters):
    model = tiny_model("llama")
    adapt_quietly(model, config, tiny_stats(model))
    perturb_adapters(model)
    with torch.no_grad():
        adapted = model(input_ids=sample_ids).logits
        original = tiny_model("llama")(input_ids=sample_ids).logits
    assert (adapted - original).abs().max() > 1e-3, "the fake training must change the outputs"

    export_peft(model, tmp_path / "original")
    assert torch.allclose(peft_logits(tiny_model("llama"), tmp_path / "original", sample_ids), adapted, atol=1e-5)

    save_quietly(export_peft, model, tmp_path / "residual", against="residual")
    save_quietly(save_residual_base, model, tmp_path / "base")
    assert torch.allclose(peft_logits(load_pretrained(tmp_path / "base"), tmp_path / "residual", sample_ids), adapted, atol=1e-5)


def test_exported_files_look_like_what_peft_writes(tmp_path, adapt_quietly, perturb_adapters):
    model = tiny_model("llama")
    report = adapt_quietly(model, PrincipalConfig(rank=4))
    export_peft(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 8  # rank 2r, scaling 1
    assert config["target_modules"] == sorted(report.layers)
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    name = report.layers[0]
    assert tensors[f"base_model.model.{name}.lora_A.weight"].shape == (8, 32)
    assert tensors[f"base_model.model.{name}.lora_B.weight"].shape == (model.get_submodule(name).base_layer.out_features, 8)
    # Untrained, the change is zero and peft's model is the original model.
    assert torch.allclose(tensors[f"base_model.model.{name}.lora_B.weight"] @ tensors[f"base_model.model.{name}.lora_A.weight"], torch.zeros(1), atol=1e-6)


def test_fixture_exports_load_in_peft(tmp_path, dense_model, fixture_path, tokenizer, adapt_quietly, perturb_adapters):
    ids = tokenizer("import os\nfor name in os.listdir('.'):\n    print(name)\n", return_tensors="pt")["input_ids"]
    adapt_quietly(dense_model, PrincipalConfig(rank=8, include=[r"layers\.[05]\."]))
    perturb_adapters(dense_model, size=0.01)
    with torch.no_grad():
        adapted = dense_model(input_ids=ids).logits
    export_peft(dense_model, tmp_path / "original", base_model_name_or_path=str(fixture_path))
    assert torch.allclose(peft_logits(load_pretrained(fixture_path), tmp_path / "original", ids), adapted, atol=1e-4)
    save_quietly(export_peft, dense_model, tmp_path / "residual", against="residual")
    save_quietly(save_residual_base, dense_model, tmp_path / "base", tokenizer=tokenizer)
    assert torch.allclose(peft_logits(load_pretrained(tmp_path / "base"), tmp_path / "residual", ids), adapted, atol=1e-4)


def test_residual_export_of_a_compressed_model_loads_on_lowrank_load(tmp_path, sample_ids, adapt_quietly, perturb_adapters):
    model = tiny_model("llama")
    report = lowrank.compress_(model, lowrank.allocate(model, 0.4, method="svd"), method="svd", progress=False)
    adapt_quietly(model, PrincipalConfig(rank=2))
    perturb_adapters(model)
    with torch.no_grad():
        adapted = model(input_ids=sample_ids).logits
    save_quietly(export_peft, model, tmp_path / "adapter", against="residual")
    save_quietly(save_residual_base, model, tmp_path / "base", report=report)
    assert torch.allclose(peft_logits(lowrank.load(tmp_path / "base"), tmp_path / "adapter", sample_ids), adapted, atol=1e-5)


def test_import_of_a_peft_trained_adapter_reproduces_peft(tmp_path, sample_ids):
    base = tiny_model("llama")
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(base, config)  # random non-zero B: a "trained" adapter
    with torch.no_grad():
        expected = peft_model(input_ids=sample_ids).logits
    peft_model.save_pretrained(tmp_path / "peft")

    model = tiny_model("llama")
    names = import_peft(model, tmp_path / "peft")
    assert len(names) == 6 and set(adapter_layers(model)) == set(names)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=sample_ids).logits, expected, atol=1e-5)
    # ... and exporting it again gives peft the same model.
    export_peft(model, tmp_path / "again")
    assert torch.allclose(peft_logits(tiny_model("llama"), tmp_path / "again", sample_ids), expected, atol=1e-5)


def test_residual_export_warns_and_bad_inputs_are_one_line_errors(tmp_path, adapt_quietly):
    model = tiny_model("llama")
    with pytest.raises(LowrankError, match="no adapters"):
        export_peft(model, tmp_path / "none")
    adapt_quietly(model, PrincipalConfig(rank=2))
    with pytest.warns(UserWarning, match="base weights are no longer the original"):
        export_peft(model, tmp_path / "residual", against="residual")
    with pytest.raises(LowrankError, match="already exists"):
        export_peft(model, tmp_path / "residual")
    with pytest.raises(LowrankError, match="unknown export target"):
        export_peft(model, tmp_path / "x", against="somewhere")
    with pytest.raises(LowrankError, match="not a PEFT adapter directory"):
        import_peft(tiny_model("llama"), tmp_path)
