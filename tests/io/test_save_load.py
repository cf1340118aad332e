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
    lowrank.save(model, tmp_path / "out")
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
    lowrank.compress_(dense_model, plan, method="whiten", stats=fixture_stats, progress=False)
    lowrank.save(dense_model, tmp_path / "out", tokenizer=tokenizer)
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
    lowrank.compress_(model, plan, method="svd", progress=False)
    lowrank.save(model, tmp_path / "out")
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
