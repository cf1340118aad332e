"""One model, any size: resizing an elastic model equals compressing directly to that size."""

import pytest
import torch

import lowrank
from lowrank.allocation import elastic_plan
from lowrank.cli.main import run
from lowrank.models import load_pretrained


@pytest.mark.parametrize("strategy", ["uniform", "global"])
def test_resize_equals_direct_compression(tmp_path, fixture_path, tokenizer, calib_text, strategy):
    model = load_pretrained(fixture_path)
    stats = lowrank.calibrate(model, tokenizer, calib_text, num_samples=4, seq_len=128, gradients=True, progress=False)
    plan = elastic_plan(model, method="whiten", stats=stats, strategy=strategy)
    report = lowrank.compress_(model, plan, method="whiten", stats=stats, progress=False)
    lowrank.save(model, tmp_path / "elastic", report=report, tokenizer=tokenizer)
    for ratio in (0.3, 0.6):
        resized, resized_report = lowrank.load(tmp_path / "elastic", ratio=ratio, return_report=True)
        direct = load_pretrained(fixture_path)
        direct_plan = lowrank.allocate(direct, ratio, method="whiten", stats=stats, strategy=strategy, allow_dense=False)
        direct_report = lowrank.compress_(direct, direct_plan, method="whiten", stats=stats, progress=False)
        assert resized_report.plan.ranks == direct_plan.ranks
        for name in direct_plan:
            torch.testing.assert_close(resized.get_submodule(name).to_dense(), direct.get_submodule(name).to_dense(), atol=1e-6, rtol=1e-5)
        assert resized_report.parameters["targeted_after"] == direct_report.parameters["targeted_after"]


def test_resize_command_and_errors(tmp_path, fixture_path, capsys):
    model = load_pretrained(fixture_path)
    report = lowrank.compress_(model, elastic_plan(model, method="svd"), method="svd", progress=False)
    lowrank.save(model, tmp_path / "elastic", report=report)
    assert run(["resize", str(tmp_path / "elastic"), "--ratio", "0.5", "--out", str(tmp_path / "half")]) == 0
    half = lowrank.load(tmp_path / "half", return_report=True)[1]
    assert 0.5 <= half.plan.achieved_ratio < 0.51
    assert run(["resize", str(fixture_path), "--ratio", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "--elastic" in capsys.readouterr().err
    assert run(["resize", str(tmp_path / "half"), "--ratio", "0.5", "--out", str(tmp_path / "y")]) == 0  # resized models stay elastic
