import copy

import pytest
import torch

from lowrank.analysis import diff
from lowrank.analysis.diff import intruder_similarities
from lowrank.errors import LowrankError


def test_model_against_itself_has_zero_delta_and_no_intruders(tiny_llama):
    table = diff(tiny_llama, copy.deepcopy(tiny_llama), progress=False)
    assert len(table) == 14
    assert (table["delta_frobenius_norm"] == 0).all() and (table["delta_rank_99"] == 0).all()
    assert (table["intruders"] == 0).all()
    assert table["min_similarity"].min() == pytest.approx(1.0)


def test_a_strong_new_direction_is_an_intruder_and_a_rank_one_delta(tiny_llama):
    tuned = copy.deepcopy(tiny_llama)
    name = "model.layers.1.mlp.up_proj"
    weight = tuned.get_submodule(name).weight
    generator = torch.Generator().manual_seed(3)
    # A direction of the output space orthogonal to the base's top singular vectors, with a large
    # singular value so that it becomes the tuned matrix's top direction.
    base_vectors = torch.linalg.svd(weight.double(), full_matrices=False).U
    direction = torch.randn(weight.shape[0], generator=generator, dtype=torch.float64)
    direction -= base_vectors[:, :8] @ (base_vectors[:, :8].T @ direction)
    direction /= direction.norm()
    update = 10 * torch.outer(direction, torch.randn(weight.shape[1], generator=generator, dtype=torch.float64) / weight.shape[1] ** 0.5)
    with torch.no_grad():
        weight += update.float()
    table = diff(tiny_llama, tuned, progress=False).set_index("name")
    assert table.loc[name, "delta_rank_99"] == 1
    assert table.loc[name, "delta_stable_rank"] == pytest.approx(1.0)
    assert table.loc[name, "intruders"] >= 1 and table.loc[name, "min_similarity"] < 0.5
    assert table.drop(index=name)["delta_frobenius_norm"].max() == 0


def test_small_noise_rotates_but_does_not_intrude():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(64, 32, generator=generator, dtype=torch.float64) * torch.logspace(0, -2, 32, dtype=torch.float64)
    tuned = base + 1e-4 * torch.randn(64, 32, generator=generator, dtype=torch.float64)
    assert intruder_similarities(base, tuned, top_k=5).min() > 0.99


def test_shape_mismatch_is_a_user_error(tiny_llama):
    import transformers
    from tiny_models import tiny_config

    config = tiny_config("llama")
    config.intermediate_size = 48
    other = transformers.LlamaForCausalLM(config)
    with pytest.raises(LowrankError, match="compare a model with its own fine-tuned version"):
        diff(tiny_llama, other, progress=False)
