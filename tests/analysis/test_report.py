import json
import re

import pandas as pd

from lowrank.analysis import analyze, write_report
from lowrank.analysis.report import FIGURES


def test_report_renders_on_the_fixture(tmp_path, dense_model, fixture_stats):
    table = analyze(dense_model, stats=fixture_stats, progress=False)
    page = write_report(table, tmp_path).read_text()
    for figure in FIGURES:
        assert (tmp_path / figure).stat().st_size > 10_000, figure
    assert set(re.findall(r'<img src="([^"]+)"', page)) == set(FIGURES)
    rows = pd.read_csv(tmp_path / "analysis.csv")
    assert len(rows) == 42 and "singular_values" not in rows and "relative_output_error_0.6" in rows
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert len(saved["matrices"]) == 42 and 1 < saved["summary"]["alpha"] < 10
