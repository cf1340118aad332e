import json

import pytest
import torch

import lowrank
from lowrank.errors import LowrankError
from tiny_models import FAMILIES, tiny_model


def random_batches(count=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (2, 16), generator=generator)} for _ in range(count)]


@pytest.mark.parametrize("method", ["svd", "whiten"])
@pytest.mark.parametrize("family", FAMILIES)
def test_compress_save_load_gives_the_same_logits(tmp_path, family, method):
    model = tiny_model(family)
    stats = lowrank.collect_statistics(model, random_batches(), lowrank.find_targets(model), progress=False)
    plan = lowrank.allocate(model, 0.5, method=method, stats=stats)
    report = lowrank.compress_(model, plan, method=method, stats=stats, progress=False)
    assert len(plan) == len(plan.shapes) > 0
    lowrank.save(model, tmp_path / "out", report=report)
    loaded = lowrank.load(tmp_path / "out")
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=1e-6, rtol=1e-6)
    saved = json.loads((tmp_path / "out" / "lowrank_config.json").read_text())
    assert saved["method"] == method and saved["ratio"] == 0.5 and saved["format_version"] == 1
    assert {name: spec["rank"] for name, spec in saved["modules"].items()} == dict(plan.ranks)
    assert saved["parameters"] == report.parameters
    assert lowrank.count_parameters(loaded) == report.parameters["model_after"]


def test_fixture_round_trip_with_tokenizer(tmp_path, dense_model, tokenizer, fixture_stats):
    plan = lowrank.allocate(dense_model, 0.3, stats=fixture_stats)
    report = lowrank.compress_(dense_model, plan, method="whiten", stats=fixture_stats, progress=False)
    lowrank.save(dense_model, tmp_path / "out", report=report, tokenizer=tokenizer)
    for name in ("config.json", "model.safetensors", "lowrank_config.json", "tokenizer.json"):
        assert (tmp_path / "out" / name).is_file(), name
    loaded = lowrank.load(tmp_path / "out")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    x = torch.randint(0, 8192, (2, 32))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, dense_model(x).logits)


def test_existing_output_is_refused_and_kept(tmp_path):
    model = tiny_model("llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(LowrankError, match="--overwrite"):
        lowrank.save(model, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    lowrank.save(model, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").is_file()


def test_failed_save_leaves_nothing_half_written(tmp_path):
    model = tiny_model("llama")

    class Broken:
        def save_pretrained(self, _directory):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        lowrank.save(model, tmp_path / "out", tokenizer=Broken())
    assert list(tmp_path.iterdir()) == []


def test_bfloat16_model_round_trips_in_its_dtype(tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    plan = lowrank.allocate(model, 0.5, method="svd")
    report = lowrank.compress_(model, plan, method="svd", progress=False)
    lowrank.save(model, tmp_path / "out", report=report)
    loaded = lowrank.load(tmp_path / "out")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_load_of_a_dense_directory_is_plain_from_pretrained(fixture_path):
    model = lowrank.load(fixture_path)
    assert lowrank.count_parameters(model) == 7_212_288


@pytest.mark.parametrize("make", ["missing", "file", "empty_dir"])
def test_bad_model_paths_are_clear_errors(tmp_path, make):
    path = tmp_path / "model"
    if make == "file":
        path.write_text("x")
    elif make == "empty_dir":
        path.mkdir()
    with pytest.raises(LowrankError):
        lowrank.load(path)


def compressed_tiny(method: str = "svd", config=None):
    model = tiny_model("llama")
    stats = lowrank.collect_statistics(model, random_batches(), lowrank.find_targets(model), progress=False) if method != "svd" else None
    report = lowrank.compress_(model, lowrank.allocate(model, 0.5, method=method, stats=stats), method=method, stats=stats, config=config, progress=False)
    return model, report


def test_a_loaded_model_saves_again_with_the_report_load_returns(tmp_path):
    model, report = compressed_tiny()
    lowrank.save(model, tmp_path / "first", report=report)
    loaded, loaded_report = lowrank.load(tmp_path / "first", return_report=True)
    assert loaded_report.modules == report.modules and loaded_report.parameters == report.parameters
    assert loaded_report.plan.ranks == report.plan.ranks and loaded_report.method == "svd"
    lowrank.save(loaded, tmp_path / "second", report=loaded_report)
    again = lowrank.load(tmp_path / "second")
    first, second = (json.loads((tmp_path / name / "lowrank_config.json").read_text()) for name in ("first", "second"))
    assert {key: value for key, value in first.items() if key != "refit_errors"} == {key: value for key, value in second.items() if key != "refit_errors"}
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)
    with pytest.raises(LowrankError, match="already compressed"):
        lowrank.compress_(again, lowrank.allocate(again, 0.5, method="svd"), method="svd", progress=False)


def test_dense_load_with_return_report_gives_none(fixture_path):
    model, report = lowrank.load(fixture_path, return_report=True)
    assert report is None and lowrank.count_parameters(model) == 7_212_288


def test_saving_a_compressed_model_needs_its_own_report(tmp_path):
    model, _ = compressed_tiny()
    _, other_report = compressed_tiny()
    del other_report.modules[next(iter(other_report.modules))]
    attempts = {
        "no report": ({}, "pass the report"),
        "a tokenizer in the report's place": ({"report": object()}, "CompressionReport"),
        "another model's report": ({"report": other_report}, "does not describe"),
    }
    for name, (kwargs, words) in attempts.items():
        with pytest.raises(LowrankError, match=words) as error:
            lowrank.save(model, tmp_path / "out", **kwargs)
        assert "\n" not in str(error.value) and not (tmp_path / "out").exists(), name


def test_resizing_a_structure_without_nested_ranks_names_the_layer(tmp_path):
    from lowrank.allocation import Plan
    from lowrank.methods.lowrank_quant import LowRankQuantConfig

    model, report = compressed_tiny("lowrank-quant", LowRankQuantConfig(iterations=1, group_size=32))
    quantized = [name for name, spec in report.modules.items() if spec["structure"] == "LowRankQuantLinear"]
    assert quantized
    lowrank.save(model, tmp_path / "out", report=report)
    # An elastic plan on top of these layers (compress --elastic refuses such a method; the loader checks again).
    config_file = tmp_path / "out" / "lowrank_config.json"
    config = json.loads(config_file.read_text())
    plan = Plan.from_dict(config["plan"])
    plan.details["elastic"] = {"strategy": "uniform", "method": "lowrank-quant"}
    config["plan"] = plan.to_dict()
    config_file.write_text(json.dumps(config))
    with pytest.raises(LowrankError, match="no nested ranks") as error:
        lowrank.load(tmp_path / "out", ratio=0.7)
    assert "\n" not in str(error.value) and "LowRankQuantLinear" in str(error.value) and "layer model." in str(error.value)
