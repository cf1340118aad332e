"""The fallback every structured method shares: start from the plain rank-r fit, keep the best offer."""

import logging

import torch

from lowrank.linalg import LowRankFactors
from lowrank.methods.structured import BestFit, residual_fit


def test_the_plain_fit_to_beat_is_the_eckart_young_optimum():
    weight = torch.randn(20, 12, generator=torch.Generator().manual_seed(0))
    best = BestFit.plain(residual_fit(weight, None, "float64", use_statistics=False), rank=5)
    singular_values = torch.linalg.svdvals(weight.double())
    assert isinstance(best.factors, LowRankFactors) and best.factors.rank == 5
    assert abs(best.error - singular_values[5:].square().sum().item()) < 1e-9 * singular_values.square().sum().item()
    assert BestFit.plain(residual_fit(weight, None, "float64", use_statistics=False), rank=50).factors.rank == 12  # capped at min(out, in)


def test_only_a_better_offer_replaces_the_plain_fit_and_a_kept_plain_fit_is_logged(caplog):
    best = BestFit(factors=LowRankFactors(torch.ones(3, 1), torch.ones(1, 2)), error=2.0)
    best.offer("worse", 3.0)
    best.offer("equal", 2.0)
    with caplog.at_level(logging.INFO, logger="lowrank.methods.structured"):
        assert isinstance(best.result("lowrank-sparse", "layers.0.q", 1, "sparse split"), LowRankFactors)
    assert "layers.0.q keeps the plain rank-1 fit (the sparse split was not better)" in caplog.text
    best.offer("better", 1.0)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lowrank.methods.structured"):
        assert best.result("lowrank-sparse", "layers.0.q", 1, "sparse split") == "better" and best.error == 1.0
    assert caplog.text == ""
