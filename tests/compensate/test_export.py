"""Export for serving, loaded by the real libraries: PEFT on the dequantized base, transformers' remote code."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from tiny_models import tiny_model

import lowrank
from lowrank.compensate import CompensateConfig, compensate_
from lowrank.compensate.export import ADAPTER_DIR, BASE_DIR, export_peft_compensation
from lowrank.errors import LowrankError


def compensated(tiny_stats, base: str, group_size: int, budget: float, tmp_path):
    model = tiny_model("llama")
    report = compensate_(model, tiny_stats, CompensateConfig(base=base, group_size=group_size), budget=budget, progress=False)
    lowrank.save(model, tmp_path / "model", report=report)
    return lowrank.load(tmp_path / "model")


def peft_model(directory):
    base = transformers.AutoModelForCausalLM.from_pretrained(directory / BASE_DIR)
    return peft.PeftModel.from_pretrained(base, str(directory / ADAPTER_DIR)).eval()


# Group size 16 has no int4 kernel: lowrank dequantizes, as the exported base is, and the logits
# agree to float32 rounding. Group size 32 runs lowrank's int4 kernel on bfloat16 activations,
# whose rounding the tolerance allows (measured: 2.9e-3 of the largest logit; the adapter moves them by 4.7e-2).
@pytest.mark.parametrize("base, group_size, tolerance", [("gptq:3", 16, 1e-6), ("wanda:2:4", 16, 1e-6), ("gptq:4", 32, 5e-3)])
def test_peft_on_the_exported_base_gives_lowrank_load_s_logits(base, group_size, tolerance, tiny_stats, sample_ids, tmp_path):
    loaded = compensated(tiny_stats, base, group_size, 1.0, tmp_path)
    export_peft_compensation(loaded, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / ADAPTER_DIR / "adapter_config.json").read_text())
    ranks = {name: module.rank for name, module in loaded.named_modules() if hasattr(module, "rank")}
    assert len(set(ranks.values())) > 1 and config["rank_pattern"]  # per-layer ranks reach PEFT
    served = peft_model(tmp_path / "peft")
    with torch.no_grad():
        expected = loaded(input_ids=sample_ids).logits
        got = served(input_ids=sample_ids).logits
        without_adapter = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / BASE_DIR)(input_ids=sample_ids).logits
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= tolerance * scale
    assert (without_adapter - expected).abs().max().item() > 5 * tolerance * scale  # the adapter is what closes the gap


def test_transformers_loads_the_packed_model_with_its_remote_code(tiny_stats, sample_ids, tmp_path):
    loaded = compensated(tiny_stats, "gptq:3", 32, 1.0, tmp_path)
    remote = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(remote(input_ids=sample_ids).logits, loaded(input_ids=sample_ids).logits, rtol=1e-5, atol=1e-5)


def test_exporting_a_model_without_corrections_fails_in_one_line(tmp_path):
    with pytest.raises(LowrankError, match="no compensated layers"):
        export_peft_compensation(tiny_model("llama"), tmp_path / "peft")
