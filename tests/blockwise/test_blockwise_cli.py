"""``lowrank compress --blockwise`` on the reference model."""

import json

import pytest
import torch

from shared_data import CALIB, needs_shared

import lowrank
from lowrank.cli.main import run


@pytest.mark.slow
@needs_shared
def test_blockwise_cli_matches_the_in_memory_quality(tmp_path, fixture_path, tokenizer, eval_text, capsys):
    common = ["--method", "whiten", "--allocate", "uniform", "--ratio", "0.4", "--calib", str(CALIB), "--num-samples", "8", "--seq-len", "128"]
    assert run(["compress", str(fixture_path), "--out", str(tmp_path / "memory"), *common]) == 0
    assert run(["compress", str(fixture_path), "--out", str(tmp_path / "blockwise"), "--blockwise", *common]) == 0, capsys.readouterr().err
    assert "targeted layers" in capsys.readouterr().out
    blockwise, memory = (json.loads((tmp_path / name / "lowrank_config.json").read_text()) for name in ("blockwise", "memory"))
    assert blockwise["parameters"] == memory["parameters"] and blockwise["modules"].keys() == memory["modules"].keys()
    assert blockwise["plan"]["details"]["blockwise"]["propagate"] == "dense"

    perplexity = {
        name: lowrank.perplexity(lowrank.load(tmp_path / name), tokenizer, eval_text, max_windows=8, progress=False)
        for name in ("blockwise", "memory")
    }
    dense = lowrank.perplexity(lowrank.load(fixture_path), tokenizer, eval_text, max_windows=8, progress=False)
    # Calibrating later blocks on the compressed blocks' outputs is a different fit, not a worse one.
    assert dense < perplexity["blockwise"] < perplexity["memory"] * 1.05


@pytest.mark.slow
@needs_shared
def test_the_default_recipe_block_by_block_is_the_in_memory_one_without_modules(tmp_path, fixture_path, capsys):
    # In memory the default shrinks whole modules (modegpt), which has no block-by-block form; the
    # block-by-block default is the in-memory recipe for the layers one at a time.
    common = ["--ratio", "0.4", "--calib", str(CALIB), "--num-samples", "8", "--seq-len", "128"]
    assert run(["compress", str(fixture_path), "--out", str(tmp_path / "memory"), "--method", "fisher-whiten", *common]) == 0
    assert run(["compress", str(fixture_path), "--out", str(tmp_path / "blockwise"), "--blockwise", *common]) == 0, capsys.readouterr().err
    blockwise, memory = (json.loads((tmp_path / name / "lowrank_config.json").read_text()) for name in ("blockwise", "memory"))
    assert blockwise["method"] == memory["method"] == "fisher-whiten" and blockwise["plan"]["strategy"] == memory["plan"]["strategy"] == "global"
    assert blockwise["plan"]["ranks"] == memory["plan"]["ranks"] and blockwise["parameters"] == memory["parameters"]
    ids = torch.randint(0, 1000, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(lowrank.load(tmp_path / "blockwise")(ids).logits, lowrank.load(tmp_path / "memory")(ids).logits, rtol=1e-3, atol=1e-3)


@needs_shared
def test_blockwise_cli_errors_and_resume(tmp_path, fixture_path, capsys):
    out = str(tmp_path / "out")
    assert run(["compress", str(fixture_path), "--out", out, "--blockwise", "--allocate", "energy", "--calib", str(CALIB)]) == 2
    assert "--blockwise compresses with --allocate uniform or global" in capsys.readouterr().err
    assert run(["compress", str(fixture_path), "--out", out, "--resume", "--method", "svd"]) == 2
    assert "add --blockwise" in capsys.readouterr().err
    # Nothing to resume yet: --resume simply starts, and finishes.
    assert run(["compress", str(fixture_path), "--out", out, "--blockwise", "--resume", "--method", "svd", "--dtype", "bfloat16"]) == 0
    assert lowrank.load(out).dtype.is_floating_point and json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
