"""``lowrank analyze`` and ``lowrank diff`` through the same entry point as the ``lowrank`` script."""

import json

from lowrank.cli.main import run


def test_analyze_with_calibration_writes_the_report_and_refuses_to_overwrite(tmp_path, fixture_path, capsys):
    out = tmp_path / "report"
    calib = fixture_path.parents[1] / "data" / "pycode-calib.txt"
    arguments = ["analyze", str(fixture_path), "--calib", str(calib), "--num-samples", "4", "--seq-len", "64",
                 "--include", r"layers\.0\.", "--out", str(out)]  # fmt: skip
    assert run(arguments) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "relative_output_error_0.4" in printed and "model.layers.0.mlp.down_proj" in printed
    assert {path.name for path in out.iterdir()} >= {"report.html", "analysis.csv", "analysis.json", "spectra.png"}
    assert len(json.loads((out / "analysis.json").read_text())["matrices"]) == 7
    assert run(arguments) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_diff_of_the_fixture_with_itself(tmp_path, fixture_path, capsys):
    assert run(["diff", str(fixture_path), str(fixture_path), "--include", r"layers\.5\.", "--out", str(tmp_path / "d")]) == 0
    assert "0 intruder dimensions in 0 of 7 matrices" in capsys.readouterr().out
    rows = json.loads((tmp_path / "d" / "diff.json").read_text())
    assert all(row["delta_frobenius_norm"] == 0 for row in rows)


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    assert run(["analyze", str(tmp_path), "--reduction", "1.5"]) == 2
    assert "--reduction must be in [0, 1)" in capsys.readouterr().err
    assert run(["diff", str(tmp_path), str(tmp_path), "--threshold", "0"]) == 2
    assert "--threshold is a cosine similarity" in capsys.readouterr().err
