"""Sequential compression with closed-form refit (compress_(..., sequential=batches)).

The references are independent of lowrank's own error bookkeeping: the layers' inputs and outputs are
captured by hooks written here, and the best a rank-r layer can do on the compressed model's inputs
is computed with numpy (:func:`references.reduced_rank_optimum`).
"""

import copy

import numpy as np
import pytest
import torch

import lowrank
from lowrank.calibration import calibration_batches
from references import reduced_rank_optimum, truncated
from tiny_models import tiny_model


def layer_io(model, name, batches):
    """One layer's inputs and outputs over all batches, (tokens × features) in float64 numpy."""
    inputs, outputs = [], []

    def hook(_module, args, output):
        inputs.append(args[0].detach().reshape(-1, args[0].shape[-1]))
        outputs.append(output.detach().reshape(-1, output.shape[-1]))

    handle = model.get_submodule(name).register_forward_hook(hook)
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"])
    handle.remove()
    return torch.cat(inputs).double().numpy(), torch.cat(outputs).double().numpy()


def refit_and_plain_errors(dense, model, name, rank, batches):
    """‖Y − Y′‖² of the compressed layer on its real inputs X̃, the rank-r optimum on X̃, and the error
    on X̃ of the plain whitened factorization (the rank-r optimum for the dense inputs X)."""
    x, y = layer_io(dense, name, batches)
    shifted, y_model = layer_io(model, name, batches)
    bias = getattr(dense.get_submodule(name), "bias", None)
    y_linear = y - (bias.detach().double().numpy() if bias is not None else 0)  # X Wᵀ
    plain = np.linalg.pinv(x) @ truncated(y_linear, rank)  # W′ᵀ minimizing ‖X Wᵀ − X W′ᵀ‖
    return (
        float(np.sum((y - y_model) ** 2)),
        reduced_rank_optimum(y_linear, shifted, rank),
        float(np.sum((y_linear - shifted @ plain) ** 2)),
        np.abs(shifted - x).max(),
    )


def first_in_block(name: str) -> bool:
    # Layers reading the block's input: in the finished model they see exactly the inputs the refit
    # saw (later layers of a block also see the block's own compressed layers).
    return any(part in name for part in ("q_proj", "k_proj", "v_proj", "c_attn"))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_refit_reaches_the_reduced_rank_optimum_on_the_compressed_inputs(family):
    model = tiny_model(family)
    dense = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 128, (4, 16), generator=generator)} for _ in range(4)]
    stats = lowrank.collect_statistics(model, batches, lowrank.find_targets(model), progress=False)
    plan = lowrank.allocate(model, 0.5, stats=stats)
    report = lowrank.compress_(model, plan, method="whiten", stats=stats, sequential=batches, progress=False)
    assert set(report.refit_errors) == set(plan.ranks)
    checked = [name for name in plan.ranks if first_in_block(name)]
    assert len(checked) >= 2
    for name in checked:
        error, optimum, plain, shift = refit_and_plain_errors(dense, model, name, plan.ranks[name], batches)
        assert error == pytest.approx(optimum, rel=1e-4), name
        if ".0." in name:  # the first block sees dense inputs: refit and plain factorization coincide
            assert shift < 1e-6 and plain == pytest.approx(optimum, rel=1e-4), name
        else:  # later blocks see shifted inputs, where the refit does measurably better
            assert shift > 1e-3 and plain > optimum * 1.005, name
        # The report's bookkeeping (from second moments) agrees with the errors measured on the tokens.
        assert report.refit_errors[name]["refit"] == pytest.approx(error, rel=1e-5), name
        assert report.refit_errors[name]["without_refit"] == pytest.approx(plain, rel=1e-5), name


def test_sequential_fixture_round_trip(tmp_path, dense_model, tokenizer, calib_text, fixture_stats):
    batches = calibration_batches(tokenizer, calib_text, num_samples=8, seq_len=64, batch_size=4)
    plan = lowrank.allocate(dense_model, 0.4, stats=fixture_stats)
    dense = copy.deepcopy(dense_model)
    report = lowrank.compress_(dense_model, plan, method="whiten", stats=fixture_stats, sequential=batches, progress=False)
    name = "model.layers.5.self_attn.q_proj"  # a deep layer, whose inputs shifted the most
    error, optimum, plain, _ = refit_and_plain_errors(dense, dense_model, name, plan.ranks[name], batches)
    assert error == pytest.approx(optimum, rel=1e-4) and plain > optimum * 1.2  # refit helps deep layers (here by 1.6×)
    lowrank.save(dense_model, tmp_path / "out", report=report)
    x = torch.randint(0, 8192, (1, 16))
    with torch.no_grad():
        assert torch.equal(lowrank.load(tmp_path / "out")(x).logits, dense_model(x).logits)


def test_whiten_refit_is_a_method_name(tmp_path):
    model = tiny_model("llama")
    batches = [{"input_ids": torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))} for _ in range(2)]
    stats = lowrank.collect_statistics(model, batches, lowrank.find_targets(model), progress=False)
    plan = lowrank.allocate(model, 0.5, stats=stats)
    with pytest.raises(lowrank.LowrankError, match="block by block"):
        lowrank.compress_(model, plan, method="whiten-refit", stats=stats, progress=False)
    same = copy.deepcopy(model)
    report = lowrank.compress_(model, plan, method="whiten-refit", stats=stats, sequential=batches, progress=False)
    assert report.method == "whiten-refit"
    lowrank.compress_(same, plan, method="whiten", stats=stats, sequential=batches, progress=False)
    x = torch.randint(0, 128, (1, 16))
    with torch.no_grad():  # the name means "whiten, refit block by block", nothing else
        assert torch.equal(model(x).logits, same(x).logits)
