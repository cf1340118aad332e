"""Global allocation and Fisher-weighted methods block by block: the in-memory model, one block at a time."""

import json

import pytest
import torch
from tiny_models import tiny_model

import lowrank
from lowrank.blockwise import compress_blockwise


def _batches(count=2, vocab=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, vocab, (4, 16), generator=generator) for _ in range(count)]
    return [{"input_ids": ids, "labels": ids} for ids in batches]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method, strategy", [("fisher-whiten", "global"), ("whiten", "global"), ("fisher-whiten", "uniform")])
def test_gradients_block_by_block_give_the_in_memory_model(tmp_path, family, method, strategy):
    tiny_model(family).save_pretrained(tmp_path / "dense")
    batches = _batches()
    model = lowrank.load(tmp_path / "dense")
    stats = lowrank.collect_statistics(model, batches, lowrank.find_targets(model), gradients=True, weight_gradients=False, progress=False)
    plan = lowrank.allocate(model, 0.5, method=method, stats=stats, strategy=strategy)
    lowrank.compress_(model, plan, method=method, stats=stats, progress=False)

    report = compress_blockwise(tmp_path / "dense", tmp_path / "blockwise", 0.5, method=method, batches=batches, strategy=strategy, progress=False)
    assert report.plan.ranks == plan.ranks  # the same knapsack over the same curves
    if strategy == "global":
        assert report.plan.predicted_error == pytest.approx(plan.predicted_error, rel=1e-6)
        assert len(plan.ranks) < len(plan.shapes) or len(set(plan.ranks.values())) > 2  # not a uniform plan in disguise
    blockwise = lowrank.load(tmp_path / "blockwise")
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(blockwise(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert not any(path.name.startswith(("input-", "statistics-")) for path in (tmp_path).rglob("*"))  # work files removed


def test_an_interrupted_gradient_run_resumes_to_the_same_output(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    batches = _batches()
    options = dict(method="fisher-whiten", batches=batches, strategy="global", progress=False)
    whole = compress_blockwise(tmp_path / "dense", tmp_path / "whole", 0.5, **options)
    assert compress_blockwise(tmp_path / "dense", tmp_path / "resumed", 0.5, max_blocks=1, **options) is None
    resumed = compress_blockwise(tmp_path / "dense", tmp_path / "resumed", 0.5, resume=True, **options)
    assert resumed.plan.ranks == whole.plan.ranks
    for name in ("model.safetensors.index.json",):
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "resumed" / name).read_text()
    shards = sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors"))
    for shard in shards:
        assert (tmp_path / "whole" / shard).read_bytes() == (tmp_path / "resumed" / shard).read_bytes(), shard
    assert json.loads((tmp_path / "whole" / "lowrank_config.json").read_text())["modules"] == json.loads(
        (tmp_path / "resumed" / "lowrank_config.json").read_text()
    )["modules"]


def test_the_factoring_pass_reads_the_first_pass_statistics_instead_of_running_blocks(tmp_path, monkeypatch):
    from lowrank.blockwise import pipeline

    tiny_model("llama").save_pretrained(tmp_path / "dense")
    options = dict(method="fisher-whiten", batches=_batches(), strategy="global", progress=False)
    monkeypatch.setattr(pipeline, "_room_for_statistics", lambda *args: False)  # no disk to spare: every block runs again
    again = compress_blockwise(tmp_path / "dense", tmp_path / "again", 0.5, **options)
    monkeypatch.undo()

    def no_forward(*args, **kwargs):
        raise AssertionError("the factoring pass ran a block although the first pass kept its statistics")

    monkeypatch.setattr(pipeline, "block_statistics", no_forward)
    kept = compress_blockwise(tmp_path / "dense", tmp_path / "kept", 0.5, **options)
    assert kept.plan.ranks == again.plan.ranks and kept.modules == again.modules
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(lowrank.load(tmp_path / "kept")(ids).logits, lowrank.load(tmp_path / "again")(ids).logits, rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.rglob("statistics-*"))


def test_gradients_need_labels_and_dense_propagation(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    unlabeled = [{"input_ids": batch["input_ids"]} for batch in _batches()]
    with pytest.raises(lowrank.LowrankError, match="labels"):
        compress_blockwise(tmp_path / "dense", tmp_path / "a", 0.5, method="whiten", batches=unlabeled, strategy="global", progress=False)
    with pytest.raises(lowrank.LowrankError, match="--propagate dense"):
        compress_blockwise(tmp_path / "dense", tmp_path / "b", 0.5, method="whiten", batches=_batches(), strategy="global", propagate="compressed", progress=False)
    with pytest.raises(lowrank.LowrankError, match="uniform or global"):
        compress_blockwise(tmp_path / "dense", tmp_path / "c", 0.5, method="whiten", batches=_batches(), strategy="energy", progress=False)
