"""MoDeGPT type II's pair selection and costs on a tiny grouped-query head, against brute force: the
CR score from matrix square roots of the output correlations (not their diagonals), every subset of
pairs enumerated, and the dropped pairs' cost measured on the outputs themselves."""

from __future__ import annotations

import itertools

import pytest
import torch

from lowrank.errors import LowrankError
from lowrank.linalg.query_key import (
    cr_pair_scores,
    dropped_pair_errors,
    kept_dimensions,
    pair_costs,
    pair_order,
    projection_energies,
    rotary_pairs,
)


def square_root(c: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(c)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def test_selection_is_the_best_pair_subset_by_brute_force():
    """Two query heads read one key head (d = 8, 4 rotary pairs (i, i + 4)): for every k the kept pairs
    maximize Σ_j Σ_{i∈kept dims} ‖C_qj^{1/2}[:, i]‖·‖C_k^{1/2}[:, i]‖ over all C(4, k) subsets, and the
    curve at k is the dropped dimensions' Fisher-weighted output error, the mean of the query and key sides."""
    generator = torch.Generator().manual_seed(0)
    group, head_dim, inputs, tokens = 2, 8, 12, 40
    scales = torch.rand(group * head_dim, 1, generator=generator, dtype=torch.float64) * 3  # unequal dimensions
    query_weight = torch.randn(group * head_dim, inputs, generator=generator, dtype=torch.float64) * scales
    key_weight = torch.randn(head_dim, inputs, generator=generator, dtype=torch.float64)
    x = torch.randn(inputs, tokens, generator=generator, dtype=torch.float64)
    query_fisher = torch.rand(group, head_dim, generator=generator, dtype=torch.float64)
    key_fisher = torch.rand(head_dim, generator=generator, dtype=torch.float64)
    q, k = (query_weight @ x).unflatten(0, (group, head_dim)), key_weight @ x  # (G, d, T), (d, T)

    key_root = square_root(k @ k.T)
    per_dimension = sum(square_root(q[j] @ q[j].T).norm(dim=0) * key_root.norm(dim=0) for j in range(group))  # (d,)
    query_energies = projection_energies(query_weight, x @ x.T).view(group, head_dim)
    key_energies = projection_energies(key_weight, x @ x.T)
    order = pair_order(cr_pair_scores(query_energies, key_energies))
    curve = dropped_pair_errors(pair_costs(query_energies, key_energies, query_fisher, key_fisher), order)
    pairs = rotary_pairs(head_dim).tolist()
    assert pairs == [[0, 4], [1, 5], [2, 6], [3, 7]]
    for kept in range(len(pairs) + 1):
        chosen = kept_dimensions(order, kept, head_dim)
        best = max(sum(per_dimension[i].item() for p in subset for i in pairs[p]) for subset in itertools.combinations(range(4), kept))
        assert per_dimension[chosen].sum().item() == pytest.approx(best, rel=1e-12)
        dropped = torch.tensor([i for i in range(head_dim) if i not in chosen.tolist()], dtype=torch.long)
        query_side = (query_fisher[:, dropped, None] * q[:, dropped].pow(2)).sum().item()
        key_side = (key_fisher[dropped, None] * k[dropped].pow(2)).sum().item()
        assert curve[kept].item() == pytest.approx(0.5 * (query_side + key_side), rel=1e-10, abs=1e-12)
    assert curve[-1] == 0 and (curve.diff() <= 0).all()


def test_scores_ignore_the_order_of_the_heads_and_ties_keep_the_index_order():
    energies = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 4.0, 0.0]])
    assert cr_pair_scores(energies, torch.ones(4)).tolist() == cr_pair_scores(energies.flip(0), torch.ones(4)).tolist() == [6.0, 2.0]
    assert pair_order(torch.tensor([1.0, 1.0, 2.0])).tolist() == [2, 0, 1]


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(LowrankError, match="even head dimension"):
        rotary_pairs(5)
    with pytest.raises(LowrankError, match="do not match"):
        cr_pair_scores(torch.ones(2, 4), torch.ones(6))
    with pytest.raises(LowrankError, match="can keep 0 … 2 rotary pairs"):
        kept_dimensions(torch.tensor([0, 1]), 3, 4)
