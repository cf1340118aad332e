"""``basis-sharing`` end to end on a tiny Llama: budget, exact storage counts, save → load, the whiten
fallback, the CLI, and refusals."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from method_helpers import assert_same_logits, one_thread  # noqa: F401  (fixture)
from safetensors import safe_open
from tiny_models import tiny_model

import lowrank
from lowrank.compress import storage_bits
from lowrank.errors import LowrankError
from lowrank.linalg import output_error, rank_for_ratio
from lowrank.methods.basis_sharing import BasisSharingConfig, compress_basis_sharing_
from lowrank.nn import LowRankLinear, linear_weight
from lowrank.nn.shared_basis_linear import SharedBasisLinear

RATIO = 0.4
LAYERS = r"layers\.[0-2]\.(self_attn\.k_proj|mlp\.up_proj|mlp\.down_proj)"  # a few layers keep the CLI run short


def _batches(count: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (2, 24), generator=generator)} for _ in range(count)]


def _calibrated(model):
    return lowrank.collect_statistics(model, _batches(), lowrank.find_targets(model), progress=False)


@pytest.fixture(scope="module")
def run():
    """(dense copy, stats, compressed model, plan, report) at RATIO with default options."""
    torch.set_num_threads(1)
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    stats = _calibrated(model)
    plan = lowrank.allocate(model, RATIO, method="basis-sharing", stats=stats)
    report = lowrank.compress_(model, plan, method="basis-sharing", stats=stats, progress=False)
    return dense, stats, model, plan, report


def _calibration_errors(dense, model, stats, names) -> float:
    return sum(output_error(linear_weight(dense.get_submodule(n)).detach(), model.get_submodule(n).to_dense().detach(), stats[n].xtx) for n in names)


def test_groups_share_one_basis_and_the_counts_are_exact(run):
    _, _, model, plan, report = run
    groups = plan.details["basis_sharing"]["groups"]
    assert {name.rpartition(".")[2] for name in groups} == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}  # the paper's choice
    by_hand, shared_groups = 0, 0
    for entry in groups.values():
        first, second = (model.get_submodule(name) for name in entry["members"])
        if entry["structure"] == "basis-sharing":
            shared_groups += 1
            assert isinstance(first, SharedBasisLinear) and second.basis is first.basis and second.basis_from == entry["members"][0]
            out_features, in_features = first.out_features, first.in_features
            assert first.rank == entry["rank"] and entry["shared_parameters"] == entry["rank"] * (in_features + 2 * out_features)
    assert shared_groups >= 3
    for name, (out_features, in_features) in plan.shapes.items():
        module = model.get_submodule(name)
        if isinstance(module, SharedBasisLinear):
            by_hand += module.coefficients.numel() + (module.basis.numel() if module.basis_from is None else 0)
        else:
            assert isinstance(module, LowRankLinear) and module.rank == rank_for_ratio(out_features, in_features, RATIO)
            by_hand += module.rank * (out_features + in_features)
    counts = report.parameters
    assert counts["targeted_after"] == by_hand  # the tiny Llama has no biases; each basis once
    assert plan.planned_parameters == by_hand  # what `lowrank plan` prints
    assert counts["targeted_after"] <= (1 - RATIO) * counts["targeted_before"]
    assert counts["targeted_bits_after"] == by_hand * 32 == sum(storage_bits(model.get_submodule(name)) for name in plan.shapes)
    assert counts["model_after"] == lowrank.count_parameters(model) == counts["model_before"] - counts["targeted_before"] + by_hand


def test_never_worse_than_whiten_on_the_calibration_objective(run):
    dense, stats, model, plan, _ = run
    whitened = copy.deepcopy(dense)
    lowrank.compress_(whitened, lowrank.allocate(whitened, RATIO, method="whiten"), method="whiten", stats=stats, progress=False)
    for entry in plan.details["basis_sharing"]["groups"].values():
        ours = _calibration_errors(dense, model, stats, entry["members"])
        theirs = _calibration_errors(dense, whitened, stats, entry["members"])
        assert ours <= theirs * (1 + 1e-6)
        assert ours == pytest.approx(entry["error"] if entry["structure"] == "basis-sharing" else entry["factored_error"], rel=1e-4)


def test_save_load_gives_the_same_logits_and_stores_each_basis_once(run, tmp_path, caplog):
    _, _, model, plan, report = run
    with caplog.at_level(logging.INFO, logger="lowrank.io.remote_code"):
        lowrank.save(model, tmp_path / "out", report=report)
    assert "loads with lowrank.load only" in caplog.text and not (tmp_path / "out" / "modeling_lowrank.py").exists()
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as weights:
        keys = set(weights.keys())
    shared = [e for e in plan.details["basis_sharing"]["groups"].values() if e["structure"] == "basis-sharing"]
    assert {key for key in keys if key.endswith(".basis")} == {entry["members"][0] + ".basis" for entry in shared}
    loaded, loaded_report = lowrank.load(tmp_path / "out", return_report=True)
    assert_same_logits(model, loaded)
    for entry in shared:
        first, second = (loaded.get_submodule(name) for name in entry["members"])
        assert second.basis is first.basis
    assert loaded_report.parameters == report.parameters and lowrank.count_parameters(loaded) == report.parameters["model_after"]
    _, half_report = lowrank.load(tmp_path / "out", dtype="bfloat16", return_report=True)  # cast: bits recounted, basis still once
    assert half_report.parameters["targeted_bits_after"] == report.parameters["targeted_bits_after"] // 2


def test_one_block_groups_are_exactly_whiten(one_thread):  # noqa: F811
    model = tiny_model("llama")
    stats = _calibrated(model)
    config = BasisSharingConfig(group=1)
    plan = lowrank.allocate(model, RATIO, method="basis-sharing", stats=stats, strategy_config=config)
    compress_basis_sharing_(model, plan, stats, config, progress=False)
    whitened = tiny_model("llama")
    lowrank.compress_(whitened, lowrank.allocate(whitened, RATIO, method="whiten"), method="whiten", stats=stats, progress=False)
    assert_same_logits(whitened, model)


def test_a_group_whose_layers_read_different_subspaces_falls_back_to_whiten(caplog, one_thread):  # noqa: F811
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # q_proj of block 0 reads only the first half of the inputs, block 1 only the second
        for index, half in ((0, slice(16, 32)), (1, slice(0, 16))):
            weight = model.model.layers[index].self_attn.q_proj.weight
            weight.copy_(torch.randn(weight.shape, generator=generator))
            weight[:, half] = 0.0
    stats = _calibrated(model)
    with caplog.at_level(logging.INFO, logger="lowrank.methods.basis_sharing"):
        plan = lowrank.allocate(model, RATIO, method="basis-sharing", stats=stats)
    entry = plan.details["basis_sharing"]["groups"]["model.layers.0-1.self_attn.q_proj"]
    assert entry["structure"] == "whiten" and entry["factored_error"] < entry["error"]
    assert "model.layers.0-1.self_attn.q_proj is factored with whiten" in caplog.text
    lowrank.compress_(model, plan, method="basis-sharing", stats=stats, progress=False)
    assert isinstance(model.model.layers[1].self_attn.q_proj, LowRankLinear)


def test_output_side_sharing_of_o_and_down(one_thread, tmp_path):  # noqa: F811
    model = tiny_model("llama")
    stats = _calibrated(model)
    config = BasisSharingConfig(share_outputs="o_proj,down_proj", fallback=False)
    plan = lowrank.allocate(model, RATIO, method="basis-sharing", stats=stats, strategy_config=config)
    report = lowrank.compress_(model, plan, method="basis-sharing", stats=stats, config=config, progress=False)
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(down, SharedBasisLinear) and down.side == "output" and down.basis is model.model.layers[0].mlp.down_proj.basis
    lowrank.save(model, tmp_path / "out", report=report)
    assert_same_logits(model, lowrank.load(tmp_path / "out"))


def test_bad_input_is_a_one_line_error(run):
    dense, stats, model, plan, _ = run
    fresh = copy.deepcopy(dense)
    cases = [
        (lambda: lowrank.allocate(fresh, RATIO, method="basis-sharing", stats=stats, strategy="global"), "--allocate uniform"),
        (lambda: lowrank.allocate(fresh, RATIO, method="basis-sharing"), "calibration statistics"),
        (
            lambda: lowrank.allocate(fresh, RATIO, method="basis-sharing", stats=stats, strategy_config=BasisSharingConfig(share_outputs="k_proj")),
            "both share and share_outputs",
        ),
        (lambda: lowrank.allocate(fresh, RATIO, method="basis-sharing", stats=stats, strategy_config=BasisSharingConfig(group=0)), "≥ 1"),
        (
            lambda: compress_basis_sharing_(fresh, lowrank.allocate(fresh, RATIO, method="whiten"), stats, progress=False),
            "not made for basis-sharing",
        ),
        (lambda: lowrank.compress_(model, plan, method="basis-sharing", stats=stats, progress=False), "already compressed"),
        (lambda: lowrank.compress_(fresh, plan, method="basis-sharing", stats=stats, sequential=_batches(1), progress=False), "no sequential refit"),
        (
            lambda: lowrank.get_method("basis-sharing").factorize(torch.zeros(4, 4), None, 2, BasisSharingConfig(), "layer"),
            "shares a basis across layers",
        ),
    ]
    for call, message in cases:
        with pytest.raises(LowrankError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


def test_cli_compresses_with_basis_sharing_and_blockwise_refuses_it(run, tmp_path, capsys):
    from shared_data import CALIB, FIXTURE

    from lowrank.cli.main import run as cli

    if not FIXTURE.is_dir():
        pytest.skip(f"reference model not found at {FIXTURE}")
    out = tmp_path / "shared-30"
    code = cli(["compress", str(FIXTURE), "--method", "basis-sharing", "--allocate", "uniform", "--ratio", "0.3", "--calib", str(CALIB),
                "--num-samples", "4", "--seq-len", "64", "--option", "group=3", "--include", LAYERS, "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    loaded, saved = lowrank.load(out, return_report=True)
    assert saved.method == "basis-sharing" and saved.method_config["group"] == 3
    shared = [module for module in loaded.modules() if isinstance(module, SharedBasisLinear)]
    assert len(shared) == 6 and all(module.basis is not None for module in shared)  # k_proj and up_proj of blocks 0-2; down_proj whitened
    assert isinstance(loaded.model.layers[2].mlp.down_proj, LowRankLinear)
    assert 0.29 < 1 - saved.parameters["targeted_after"] / saved.parameters["targeted_before"] <= 0.31
    code = cli(["compress", str(FIXTURE), "--method", "basis-sharing", "--allocate", "uniform", "--ratio", "0.3", "--calib", str(CALIB),
                "--num-samples", "4", "--seq-len", "64", "--blockwise", "--out", str(tmp_path / "blockwise")])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "without --blockwise" in err and not (tmp_path / "blockwise").exists()
