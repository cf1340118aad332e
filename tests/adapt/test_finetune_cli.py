"""``lowrank finetune`` and ``lowrank merge-peft`` end to end on the fixture, checked with peft."""

from __future__ import annotations

import peft
import pytest
import torch

from lowrank.cli.main import run
from lowrank.models import load_pretrained

QUICK = ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--include", r"layers\.0\.self_attn"]


def test_finetune_writes_adapters_peft_loads_and_merge_peft_reproduces_them(tmp_path, fixture_path, data_dir, tokenizer, capsys):
    ids = tokenizer("class Stack:\n    def push(self, item):\n", return_tensors="pt")["input_ids"]
    out = tmp_path / "covariance"
    code = run(["finetune", str(fixture_path), "--data", str(data_dir / "pycode-eval.txt"), "--out", str(out), "--init", "covariance", "--calib", str(data_dir / "pycode-calib.txt"), "--num-samples", "2", *QUICK])
    assert code == 0, capsys.readouterr().err
    assert "trainable parameters" in capsys.readouterr().out
    model = peft.PeftModel.from_pretrained(load_pretrained(fixture_path), str(out))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        original = load_pretrained(fixture_path)(input_ids=ids).logits
    assert (expected - original).abs().max() > 1e-4, "two steps of training must change the model"

    assert run(["merge-peft", str(fixture_path), str(out), "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        assert torch.allclose(load_pretrained(tmp_path / "merged")(input_ids=ids).logits, expected, atol=1e-4)

    residual = tmp_path / "residual"
    assert run(["finetune", str(fixture_path), "--data", str(data_dir / "pycode-eval.txt"), "--out", str(residual), "--init", "singular-value", "--export", "residual", *QUICK]) == 0
    assert (residual / "base" / "config.json").is_file() and (residual / "adapter" / "adapter_config.json").is_file()
    peft.PeftModel.from_pretrained(load_pretrained(residual / "base"), str(residual / "adapter"))


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--init", "lora-ish"], "unknown --init"),
        (["--init", "covariance"], "needs calibration text"),
        (["--init", "minor", "--svd", "randomized"], "randomized SVD cannot find"),
        (["--export", "elsewhere"], "unknown --export"),
        (["--init", "welore"], "compress it first"),
    ],
)
def test_finetune_user_errors_are_one_line(arguments, message, tmp_path, fixture_path, data_dir, capsys):
    assert run(["finetune", str(fixture_path), "--data", str(data_dir / "pycode-eval.txt"), "--out", str(tmp_path / "x"), *QUICK, *arguments]) == 2
    assert message in capsys.readouterr().err


def test_finetune_refuses_to_overwrite(tmp_path, fixture_path, data_dir, capsys):
    (tmp_path / "taken").mkdir()
    assert run(["finetune", str(fixture_path), "--data", str(data_dir / "pycode-eval.txt"), "--out", str(tmp_path / "taken"), *QUICK]) == 2
    assert "--overwrite" in capsys.readouterr().err
