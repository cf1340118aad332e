"""Sequential refit with stages and the anchor, on real (tiny and reference) Hugging Face models.

The references are independent of lowrank's bookkeeping: every layer's inputs and outputs are
captured by hooks written here, and the best a rank-r layer can
do is computed with numpy (:func:`references.reduced_rank_optimum`) on the stacked token matrix
of the anchored objective.
"""

import copy

import numpy as np
import pytest
import torch

import lowrank
from lowrank.calibration.paired import input_stages
from lowrank.compress import compress_layers_
from threads import one_thread  # noqa: F401  (autouse: one torch thread)
from tiny_models import tiny_model


def _setup(family="llama", ratio=0.5, gradients=False):
    model = tiny_model(family)
    generator = torch.Generator().manual_seed(0)
    # 1024 tokens: the MLP output layers (128 inputs in GPT-2) get well-conditioned inputs to refit on.
    batches = [{"input_ids": torch.randint(0, 128, (8, 32), generator=generator)} for _ in range(4)]
    stats = lowrank.collect_statistics(model, [dict(b, labels=b["input_ids"]) for b in batches] if gradients else batches, lowrank.find_targets(model), gradients=gradients, progress=False)
    return model, batches, stats, lowrank.allocate(model, ratio, stats=stats)


def _layer_io(model, names, batches):
    """Every layer's inputs and outputs over all batches, (tokens × features) float64 numpy, from one pass per batch."""
    captured = {name: ([], []) for name in names}

    def hook(name):
        def record(_module, args, output):
            captured[name][0].append(args[0].detach().reshape(-1, args[0].shape[-1]))
            captured[name][1].append(output.detach().reshape(-1, output.shape[-1]))

        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"])
    for handle in handles:
        handle.remove()
    return {name: (torch.cat(i).double().numpy(), torch.cat(o).double().numpy()) for name, (i, o) in captured.items()}


def _reduced_rank_optimum(outputs: np.ndarray, inputs: np.ndarray, rank: int) -> float:
    """min over rank-r W′ of ‖Y − X W′ᵀ‖² (numpy), X's column space cut at 1e-6 of its largest singular value.

    Once v_proj is compressed, o_proj's input is exactly rank-deficient (20 of 32 dimensions in the
    tiny Llama); its other singular values are float32 round-off (1e-8), through which an exact
    least-squares solution would "fit" another 15 % of the output: noise, not a better layer
    (``references.reduced_rank_optimum`` keeps directions down to 1e-10, right for float64 data).
    """
    # torch's LAPACK on one thread (numpy's OpenBLAS threads crawl on a busy machine); same float64 math.
    inputs, outputs = torch.from_numpy(inputs), torch.from_numpy(outputs)
    u, s, _ = torch.linalg.svd(inputs, full_matrices=False)
    basis = u[:, s > s[0] * 1e-6]
    projected = basis @ (basis.T @ outputs)
    singular_values = torch.linalg.svdvals(projected)
    return float((outputs - projected).pow(2).sum() + singular_values[rank:].pow(2).sum())


def _anchored_optimum(dense_io, model_io, dense, model, name, rank, anchor):
    """min over rank-r W′ of (1 − α)‖Y − X̃W′ᵀ‖² + α‖Y − XW′ᵀ‖² on the tokens, and the layer's value of it."""
    (x, y), (shifted, _) = dense_io[name], model_io[name]
    y = _linear_outputs(dense, name, y)  # X Wᵀ
    ours = model.get_submodule(name).to_dense().detach().double().numpy()
    inputs = np.vstack([np.sqrt(1 - anchor) * shifted, np.sqrt(anchor) * x])
    outputs = np.vstack([np.sqrt(1 - anchor) * y, np.sqrt(anchor) * y])
    return _reduced_rank_optimum(outputs, inputs, rank), float(np.sum((outputs - inputs @ ours.T) ** 2))


def _linear_outputs(dense, name, y):
    bias = getattr(dense.get_submodule(name), "bias", None)
    return y - (bias.detach().double().numpy() if bias is not None else 0)


@pytest.mark.parametrize(
    "family, expected",
    [
        ("llama", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
        ("gpt2", [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]),
    ],
)
def test_input_stages_group_the_layers_that_read_one_tensor(family, expected):
    model = tiny_model(family)
    prefix = "model.layers.1." if family == "llama" else "transformer.h.1."
    names = [prefix + name for stage in expected for name in stage]
    batch = {"input_ids": torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))}
    stages = input_stages(model, list(reversed(names)), batch, stop_after=prefix[:-1])
    assert [sorted(stage) for stage in stages] == [sorted(prefix + name for name in stage) for stage in expected]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_staged_refit_is_optimal_on_the_inputs_of_every_layer(family):
    # Unstaged, o_proj / down_proj were refit to inputs computed before their own block's q/k/v
    # (gate/up) were compressed: on the finished model's real inputs they are measurably off the
    # optimum. Staged, every layer (not only those reading the block's input) reaches it.
    model, batches, stats, plan = _setup(family)
    dense = copy.deepcopy(model)
    unstaged = copy.deepcopy(model)
    lowrank.compress_(model, plan, method="whiten", stats=stats, sequential=batches, progress=False, anchor=0.0)
    compress_layers_(unstaged, plan, method="whiten", stats=stats, config=None, sequential=batches, progress=False)  # the refit as it was
    names = list(plan.ranks)
    dense_io, model_io, unstaged_io = (_layer_io(m, names, batches) for m in (dense, model, unstaged))
    gaps = []
    for name in names:
        optimum, ours = _anchored_optimum(dense_io, model_io, dense, model, name, plan.ranks[name], 0.0)
        # 1e-3: the refit solves from float32-summed second moments, whose round-off directions
        # (see _reduced_rank_optimum) move a rank-deficient layer's error by up to 1e-4.
        assert ours == pytest.approx(optimum, rel=1e-3), name
        optimum, theirs = _anchored_optimum(dense_io, unstaged_io, dense, unstaged, name, plan.ranks[name], 0.0)
        gaps.append(theirs / optimum)
    assert max(gaps) > 1.01  # the test can tell the two apart


def test_anchored_refit_is_the_anchored_optimum_and_never_worse_than_one_shot():
    model, batches, stats, plan = _setup("llama")
    dense, one_shot = copy.deepcopy(model), copy.deepcopy(model)
    lowrank.compress_(one_shot, plan, method="whiten", stats=stats, progress=False)
    report = lowrank.compress_(model, plan, method="whiten", stats=stats, sequential=batches, progress=False, anchor=0.5)
    names = list(plan.ranks)
    dense_io, model_io = _layer_io(dense, names, batches), _layer_io(model, names, batches)
    for name in names:
        optimum, ours = _anchored_optimum(dense_io, model_io, dense, model, name, plan.ranks[name], 0.5)
        if "fell_back" not in report.refit_errors[name]:
            assert ours == pytest.approx(optimum, rel=1e-3), name
        # The calibration objective ‖WX − W′X̃‖² on the finished model's inputs, against the one-shot factors.
        (_, y), (shifted, y_model) = dense_io[name], model_io[name]
        w_one_shot = one_shot.get_submodule(name).to_dense().detach().double().numpy()
        assert float(np.sum((y - y_model) ** 2)) <= float(np.sum((_linear_outputs(dense, name, y) - shifted @ w_one_shot.T) ** 2)) * (1 + 1e-6), name


def test_fisher_weighted_refit_never_loses_to_one_shot_on_its_objective():
    model, batches, stats, _ = _setup("llama", gradients=True)
    plan = lowrank.allocate(model, 0.5, method="fisher-whiten", stats=stats, strategy="global")
    dense, one_shot = copy.deepcopy(model), copy.deepcopy(model)
    lowrank.compress_(one_shot, plan, method="fisher-whiten", stats=stats, progress=False)
    lowrank.compress_(model, plan, method="fisher-whiten", stats=stats, sequential=batches, progress=False, anchor=0.5)
    names = list(plan.ranks)
    dense_io, model_io = _layer_io(dense, names, batches), _layer_io(model, names, batches)
    for name in names:
        weights = stats[name].output_fisher.double().numpy()
        (x, y), (shifted, y_model) = dense_io[name], model_io[name]
        w_one_shot = one_shot.get_submodule(name).to_dense().detach().double().numpy()
        ours = float(np.sum((y - y_model) ** 2 * weights))
        theirs = float(np.sum((x @ dense.get_submodule(name).weight.detach().double().numpy().T - shifted @ w_one_shot.T) ** 2 * weights))
        assert ours <= theirs * (1 + 1e-6), name


@pytest.mark.parametrize("anchor, sequential, message", [(1.5, True, r"anchor must lie in \[0, 1\]"), (0.5, False, "applies to the sequential refit")])
def test_bad_anchor_is_refused_before_anything_changes(anchor, sequential, message):
    model, batches, stats, plan = _setup("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(lowrank.LowrankError, match=message):
        lowrank.compress_(model, plan, method="whiten", stats=stats, sequential=batches if sequential else None, progress=False, anchor=anchor)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_anchored_model_round_trip(tmp_path):
    model, batches, stats, plan = _setup("llama")
    report = lowrank.compress_(model, plan, method="whiten", stats=stats, sequential=batches, progress=False, anchor=0.5)
    lowrank.save(model, tmp_path / "out", report=report)
    x = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lowrank.load(tmp_path / "out")(x).logits, model(x).logits)


@pytest.mark.slow
def test_the_cli_passes_the_anchor_and_refuses_it_without_sequential(tmp_path, capsys):
    from shared_data import CALIB, needs_shared

    from lowrank.cli.main import run

    needs_shared()
    fixture = CALIB.parents[1] / "fixtures" / "pycode-llama"
    common = ["compress", str(fixture), "--method", "whiten", "--allocate", "uniform", "--ratio", "0.4", "--calib", str(CALIB),
              "--num-samples", "4", "--seq-len", "64"]  # fmt: skip
    assert run([*common, "--anchor", "0.5", "--out", str(tmp_path / "a")]) == 2
    assert "--anchor takes a value in [0, 1] and needs --sequential" in capsys.readouterr().err
    assert run([*common, "--sequential", "--anchor", "1.5", "--out", str(tmp_path / "b")]) == 2
    outputs = {}
    for name, extra in (("plain", []), ("anchored", ["--anchor", "0.5"])):
        assert run([*common, "--sequential", *extra, "--out", str(tmp_path / name)]) == 0, capsys.readouterr().err
        outputs[name] = lowrank.load(tmp_path / name)
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.equal(outputs["plain"](ids).logits, outputs["anchored"](ids).logits)  # the flag reaches the refit
