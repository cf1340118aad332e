import logging

import pytest
import torch

import lowrank
from lowrank.linalg import output_error, truncated_svd, whitened_spectrum, whitened_svd, whitening
from lowrank.linalg.whiten import SINGULAR_THRESHOLD


def correlated_inputs(tokens=500, features=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator, dtype=torch.float64)
    scales = torch.logspace(0, -3, features, dtype=torch.float64)
    return torch.randn(tokens, features, generator=generator, dtype=torch.float64) @ (mixing * scales)


def test_full_rank_reproduces_weight():
    weight, x = torch.randn(16, 24, dtype=torch.float64), correlated_inputs()
    factors = whitened_svd(weight, x.T @ x, rank=16)
    torch.testing.assert_close(factors.dense(), weight, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("rank", [1, 4, 10])
def test_output_error_equals_discarded_whitened_energy(rank):
    weight, x = torch.randn(16, 24, dtype=torch.float64), correlated_inputs()
    xtx = x.T @ x
    approximation = whitened_svd(weight, xtx, rank).dense()
    direct = (x @ (weight - approximation).T).pow(2).sum().item()  # ‖(W − W′)X‖²_F from the data
    spectrum = whitened_spectrum(weight, xtx)
    assert direct == pytest.approx(spectrum[rank:].pow(2).sum().item(), rel=1e-8)
    assert output_error(weight, approximation, xtx) == pytest.approx(direct, rel=1e-8)


@pytest.mark.parametrize("seed", range(5))
def test_whitened_never_worse_than_plain_svd_on_the_data(seed):
    weight, x = torch.randn(16, 24, dtype=torch.float64), correlated_inputs(seed=seed)
    xtx = x.T @ x
    for rank in (2, 6, 12):
        whitened = output_error(weight, whitened_svd(weight, xtx, rank).dense(), xtx)
        plain = output_error(weight, truncated_svd(weight, rank).dense(), xtx)
        assert whitened <= plain * (1 + 1e-9)


def test_rank_deficient_covariance_is_damped_and_logged(caplog):
    weight = torch.randn(8, 24, dtype=torch.float64)
    x = correlated_inputs(tokens=10)  # 10 tokens, 24 features: covariance of rank 10
    with caplog.at_level(logging.INFO, logger="lowrank"):
        factors = whitened_svd(weight, x.T @ x, rank=4, name="layer.q")
    assert torch.isfinite(factors.dense()).all()
    assert any("layer.q" in record.message and "damped" in record.message for record in caplog.records)
    # Still optimal on the data it saw: no worse than plain SVD there.
    xtx = x.T @ x
    assert output_error(weight, factors.dense(), xtx) <= output_error(weight, truncated_svd(weight, 4).dense(), xtx) * (1 + 1e-6)


def test_zero_and_indefinite_covariances_do_not_fail():
    weight = torch.randn(8, 6, dtype=torch.float64)
    zero = whitened_svd(weight, torch.zeros(6, 6, dtype=torch.float64), rank=3)
    torch.testing.assert_close(zero.dense(), truncated_svd(weight, 3).dense())
    indefinite = torch.eye(6, dtype=torch.float64)
    indefinite[0, 0] = -1e-12  # round-off can make an accumulated XᵀX slightly indefinite
    assert torch.isfinite(whitened_svd(weight, indefinite, rank=3).dense()).all()


def test_damping_option_is_applied_always():
    covariance = torch.eye(4, dtype=torch.float64)
    assert whitening(covariance, damp=0.1).damping == pytest.approx(0.1)
    assert whitening(covariance).damping == 0.0


def moderately_correlated_inputs(tokens=500, features=24):
    generator = torch.Generator().manual_seed(1)
    scales = torch.logspace(0, -2, features, dtype=torch.float64)  # λ_min/λ_max ≈ 1e-5: no damping
    return torch.randn(tokens, features, generator=generator, dtype=torch.float64) @ (torch.randn(features, features, generator=generator, dtype=torch.float64) * scales)


def test_cholesky_root_whitens_the_same_matrix_as_the_symmetric_root():
    weight, x = torch.randn(16, 24, dtype=torch.float64), moderately_correlated_inputs()
    covariance = x.T @ x
    symmetric, cholesky = whitening(covariance), whitening(covariance, symmetric=False)
    assert symmetric.symmetric and not cholesky.symmetric
    assert torch.equal(cholesky.root, torch.linalg.cholesky(covariance))
    # Both are roots of C, with inverses, and the (any-root) inverse formula gives C⁻¹.
    for white in (symmetric, cholesky):
        torch.testing.assert_close(white.root @ white.root.T, covariance, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(white.inverse_root @ white.root, torch.eye(24, dtype=torch.float64), rtol=0, atol=1e-8)
        torch.testing.assert_close(white.inverse_root.T @ white.inverse_root, torch.linalg.inv(covariance), rtol=1e-7, atol=1e-7)
    # R = C^{1/2}Q, so W·R has the same spectrum and the same rank-r optimum.
    torch.testing.assert_close(torch.linalg.svdvals(weight @ cholesky.root), torch.linalg.svdvals(weight @ symmetric.root), rtol=1e-10, atol=1e-10)
    for rank in (1, 5, 12):
        same = [whitened_svd(weight, covariance, rank, white=white).dense() for white in (symmetric, cholesky)]
        torch.testing.assert_close(same[0], same[1], rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_cholesky_root_takes_the_damping_of_the_symmetric_one(damp):
    x = moderately_correlated_inputs()
    symmetric, cholesky = whitening(x.T @ x, damp=damp), whitening(x.T @ x, damp=damp, symmetric=False)
    assert cholesky.damping == pytest.approx(symmetric.damping, rel=1e-12, abs=0)
    torch.testing.assert_close(cholesky.root @ cholesky.root.T, symmetric.root @ symmetric.root, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", ["rank-deficient", "near-threshold"])
def test_near_singular_covariances_keep_the_cholesky_root_with_the_symmetric_damping(case):
    # The damping comes from exact eigenvalues (eigvalsh, without eigh's 2n² workspace), so the
    # Cholesky root whitens the matrix the symmetric path damps, and gives the same optimum.
    x = correlated_inputs(features=24)  # λ_min/λ_max = 5e-9
    if case == "rank-deficient":
        z = x[:, :10] @ torch.randn(10, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        covariance = z.T @ z  # rank 10 of 24
    else:  # factorizable, yet within 100× of the threshold
        covariance = x.T @ x
    white, reference = whitening(covariance, symmetric=False), whitening(covariance)
    assert not white.symmetric and reference.symmetric
    # λ_min of a rank-deficient XᵀX is round-off, so the two eigensolvers' damping agrees to it.
    assert white.damping == pytest.approx(reference.damping, rel=1e-4)
    if case == "rank-deficient":
        assert white.damping >= SINGULAR_THRESHOLD * torch.linalg.eigvalsh(covariance)[-1].item()
    damped = covariance + white.damping * torch.eye(24, dtype=torch.float64)
    torch.testing.assert_close(white.root @ white.root.T, damped, rtol=1e-10, atol=1e-10 * damped.abs().max().item())
    torch.testing.assert_close(white.inverse_root @ white.root, torch.eye(24, dtype=torch.float64), rtol=0, atol=1e-6)
    weight = torch.randn(16, 24, dtype=torch.float64)
    same = [whitened_svd(weight, covariance, 6, white=w).dense() for w in (white, reference)]
    torch.testing.assert_close(same[0], same[1], rtol=1e-5, atol=1e-5)


def test_an_all_zero_covariance_whitens_to_identity_either_way():
    covariance = torch.zeros(24, 24, dtype=torch.float64)
    white = whitening(covariance, symmetric=False)
    assert white.symmetric and torch.equal(white.root, torch.eye(24, dtype=torch.float64))


def test_symmetric_roots_are_formed_in_row_blocks_exactly(monkeypatch):
    # The root is built a block of rows at a time (no third n×n buffer); any block size gives the
    # same matrix as the one-product formula.
    import lowrank.linalg.whiten as module

    x = moderately_correlated_inputs()
    covariance = x.T @ x
    values, vectors = torch.linalg.eigh(covariance)
    monkeypatch.setattr(module, "_ROWS", 5)
    white = whitening(covariance)
    torch.testing.assert_close(white.root, (vectors * values.sqrt()) @ vectors.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(white.inverse_root, (vectors / values.sqrt()) @ vectors.T, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["whiten", "fisher-whiten"])
def test_mixed_precision_matches_float64_on_an_ill_conditioned_covariance(method):
    # Inputs spanning 6 decades of scale: λ_min/λ_max ≈ 1e-12, where a float32 root is noise.
    from lowrank.calibration import LayerStatistics
    from lowrank.configs import parse_overrides

    generator = torch.Generator().manual_seed(0)
    stats = LayerStatistics.zeros(96, dtype=torch.float64)
    stats.inputs.update(torch.randn(4000, 96, generator=generator, dtype=torch.float64) * torch.logspace(0, -6, 96, dtype=torch.float64))
    stats.output_grad_sq, stats.num_grad_tokens = torch.rand(128, generator=generator, dtype=torch.float64) + 0.1, 4000
    weight = torch.randn(128, 96, generator=generator)
    spec = lowrank.get_method(method)
    errors = {}
    for precision in ("float64", "mixed"):
        factors = spec.factorize(weight, stats, 24, parse_overrides(spec.config_class, [f"precision={precision}"]), name="layer")
        assert factors.up.dtype == factors.down.dtype == (torch.float32 if precision == "mixed" else torch.float64)
        errors[precision] = output_error(weight, factors.dense(), stats.xtx)
    assert errors["mixed"] == pytest.approx(errors["float64"], rel=1e-5)


def test_mixed_precision_is_refused_where_a_method_does_not_offer_it():
    from lowrank.configs import parse_overrides

    with pytest.raises(lowrank.LowrankError, match="precision must be one of float32, float64, got 'mixed'"):
        parse_overrides(lowrank.get_method("svd").config_class, ["precision=mixed"])
    assert parse_overrides(lowrank.get_method("whiten").config_class, ["precision=mixed"]).precision == "mixed"


@pytest.mark.parametrize("symmetric", [True, False])
def test_unwhiten_equals_the_product_with_the_inverse_root(symmetric):
    # A Cholesky root unwhitens by a triangular solve and never forms its n×n inverse.
    x = moderately_correlated_inputs()
    covariance = x.T @ x
    white = whitening(covariance, symmetric=symmetric)
    matrix = torch.randn(5, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    unwhitened = white.unwhiten(matrix)
    assert (white.inverse is None) == (not symmetric)
    torch.testing.assert_close(unwhitened @ white.root, matrix, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(unwhitened, matrix @ torch.linalg.inv(white.root), rtol=1e-8, atol=1e-8)


def test_a_known_damping_gives_the_searched_cholesky_root_without_searching(tmp_path):
    from lowrank.calibration import InputStatistics, LayerStatistics

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20, 48, generator=generator, dtype=torch.float64)  # 20 tokens, 48 inputs: singular
    searched = whitening(x.T @ x, symmetric=False)
    assert searched.damping > 0
    with torch.autograd.profiler.profile() as profile:
        direct = whitening(x.T @ x, symmetric=False, damping=searched.damping)
    assert not any("eigvalsh" in event.name for event in profile.function_events)  # no search
    torch.testing.assert_close(direct.root, searched.root, rtol=0, atol=0)
    assert direct.damping == searched.damping
    # Statistics remember it across passes (the cache is released in between), for this very sum only.
    stats = LayerStatistics(InputStatistics(xtx=x.T @ x, abs_sum=x.abs().sum(0), num_tokens=20))
    first = stats.whitening()
    stats.inputs._cache.clear()
    with torch.autograd.profiler.profile() as profile:
        again = stats.whitening()
    assert not any("eigvalsh" in event.name for event in profile.function_events)
    torch.testing.assert_close(again.root, first.root, rtol=0, atol=0)
    stats.inputs.xtx.mul_(2.0)  # modified in place: the remembered damping no longer applies
    stats.inputs._cache.clear()
    with torch.autograd.profiler.profile() as profile:
        doubled = stats.whitening()
    assert any("eigvalsh" in event.name for event in profile.function_events)
    assert doubled.damping == pytest.approx(2 * first.damping, rel=1e-6)
    # And across a statistics file, as the block-by-block factoring pass reads the first pass's.
    from lowrank.calibration.statistics import load_statistics, save_statistics

    save_statistics({"layer": stats}, tmp_path / "stats.safetensors")
    loaded = load_statistics(tmp_path / "stats.safetensors")["layer"]
    with torch.autograd.profiler.profile() as profile:
        reread = loaded.whitening()
    assert not any("eigvalsh" in event.name for event in profile.function_events)
    torch.testing.assert_close(reread.root, doubled.root, rtol=0, atol=0)
