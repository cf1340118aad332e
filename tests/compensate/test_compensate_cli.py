"""``lowrank compensate`` end to end on the reference model, and its refusals."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from shared_data import CALIB, needs_shared

import lowrank
from lowrank.cli.main import run


@needs_shared
def test_compensate_with_a_budget_then_load_both_ways(tmp_path, fixture_path, capsys):
    out = tmp_path / "gptq3"
    code = run(
        [
            "compensate", str(fixture_path), "--base", "gptq:3", "--budget", "0.05", "--calib", str(CALIB),
            "--num-samples", "4", "--seq-len", "64", "--include", r"layers\.[01]\.", "--out", str(out), "--peft",
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "base + correction" in printed and "gptq:3" in printed
    saved = json.loads((out / "lowrank_config.json").read_text())
    counts = saved["parameters"]
    assert saved["method"] == "compensate" and len(saved["modules"]) == 14
    assert counts["correction_bits"] <= 0.05 * counts["base_bits"]
    assert {module["structure"] for module in saved["modules"].values()} == {"LowRankQuantLinear"}
    ids = torch.randint(0, 8192, (1, 24), generator=torch.Generator().manual_seed(0))
    model = lowrank.load(out)
    served = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(out / "peft" / "base"), str(out / "peft" / "adapter"))
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, served(input_ids=ids).logits
    # lowrank runs the 3-bit codes in the int4 kernel on bfloat16 activations; PEFT the dequantized base in float32.
    assert (got - expected).abs().max() <= 1e-2 * expected.abs().max()


@needs_shared
def test_compensate_with_quantized_factors_saves_codes_and_exports_them_dequantized(tmp_path, fixture_path, capsys):
    out = tmp_path / "rtn3-fb4"
    code = run(
        [
            "compensate", str(fixture_path), "--base", "rtn:3", "--rank", "4", "--factor-bits", "4", "--calib", str(CALIB),
            "--num-samples", "2", "--seq-len", "32", "--include", r"layers\.0\.", "--out", str(out), "--peft",
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "lowrank_config.json").read_text())
    assert {module["structure"] for module in saved["modules"].values()} == {"QuantizedCorrectionLinear"}
    assert {module["factor_bits"] for module in saved["modules"].values()} == {4}
    ids = torch.randint(0, 8192, (1, 24), generator=torch.Generator().manual_seed(0))
    model = lowrank.load(out)
    served = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(out / "peft" / "base"), str(out / "peft" / "adapter"))
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, served(input_ids=ids).logits
    assert (got - expected).abs().max() <= 1e-2 * expected.abs().max()


@needs_shared
def test_compensate_fisher_weighted_with_bit_choices(tmp_path, fixture_path, capsys):
    """--fisher-weighted calibrates with gradients; --bit-choices gives some layers another base width within the budget."""
    out = tmp_path / "rtn3-mixed"
    code = run(
        [
            "compensate", str(fixture_path), "--base", "rtn:3", "--budget", "0.3", "--factor-bits", "4", "--fisher-weighted",
            "--bit-choices", "2,4", "--calib", str(CALIB), "--num-samples", "2", "--seq-len", "32", "--include", r"layers\.0\.", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "lowrank_config.json").read_text())
    assert saved["method_config"]["fisher_weighted"] and saved["method_config"]["bit_choices"] == "2,4"
    widths = {module["bits"] for module in saved["modules"].values()}
    assert widths - {3} and widths <= {2, 3, 4}, widths  # some layer's base left 3 bits
    ids = torch.randint(0, 8192, (1, 16), generator=torch.Generator().manual_seed(0))
    model = lowrank.load(out)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--rank", "4", "--budget", "0.1"], "either --rank"),
        ([], "either --rank"),
        (["--rank", "0"], "--rank must be at least 1"),
        (["--budget", "-1"], "--budget must be a positive"),
        (["--rank", "4", "--base", "gptq:9"], "base compressor"),
        (["--rank", "4", "--group-size", "0"], "--group-size must be a positive integer"),
        (["--rank", "4", "--factor-bits", "16"], "--factor-bits must be 2..8"),
        (["--rank", "4", "--base", "wanda:0.5", "--factor-bits", "4"], "needs a quantized base"),
        (["--rank", "4", "--base", "rtn:3", "--bit-choices", "4"], "--bit-choices are chosen with an extra-storage --budget"),
        (["--budget", "0.1", "--base", "rtn:3", "--bit-choices", "12"], "--bit-choices lists base widths"),
    ],
)
def test_bad_options_fail_in_one_line_before_any_work(arguments, message, tmp_path, capsys):
    code = run(["compensate", str(tmp_path / "missing-model"), "--calib", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out"), *arguments])
    assert code != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@needs_shared
def test_an_existing_output_is_kept_without_overwrite(tmp_path, fixture_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = run(["compensate", str(fixture_path), "--rank", "4", "--calib", str(CALIB), "--out", str(out)])
    assert code != 0 and "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
