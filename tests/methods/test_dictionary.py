import pytest
import torch

import lowrank
from lowrank.calibration import LayerStatistics
from lowrank.cli.main import run
from lowrank.linalg import output_error, truncated_svd, whitened_svd
from lowrank.linalg.omp import orthogonal_matching_pursuit
from lowrank.methods.dictionary import DictionaryConfig, build, dictionary_shape, factorize, learn_dictionary
from lowrank.nn import DictionaryLinear, LowRankLinear
from lowrank.nn.dictionary_linear import DictionaryFactors
from method_helpers import one_thread  # noqa: F401  (fixture)
from method_helpers import assert_same_logits, budget_bits, compress_save_load, weight_bits
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def sparse_dictionary_weight(out_features, in_features, num_atoms, nonzeros, generator, dtype=torch.float64):
    """Rows that each mix ``nonzeros`` of ``num_atoms`` random atoms: the structure this method is for."""
    atoms = torch.randn(num_atoms, in_features, generator=generator, dtype=dtype)
    codes = torch.zeros(out_features, num_atoms, dtype=dtype)
    for row in range(out_features):
        codes[row, torch.randperm(num_atoms, generator=generator)[:nonzeros]] = torch.randn(nonzeros, generator=generator, dtype=dtype)
    return codes @ atoms


def input_statistics(in_features, seed=0):
    generator = torch.Generator().manual_seed(seed)
    stats = LayerStatistics.zeros(in_features)
    stats.inputs.update(torch.randn(300, in_features, generator=generator, dtype=torch.float64) * torch.logspace(-0.5, 0.5, in_features, dtype=torch.float64))
    return stats


@pytest.mark.parametrize("signals, atoms, nonzeros", [(30, 50, 3), (10, 12, 12), (64, 40, 1)])
def test_omp_recovers_planted_sparse_codes(signals, atoms, nonzeros):
    generator = torch.Generator().manual_seed(0)
    dictionary = torch.randn(atoms, 200, generator=generator, dtype=torch.float64)
    codes = torch.zeros(signals, atoms, dtype=torch.float64)
    for row in range(signals):
        codes[row, torch.randperm(atoms, generator=generator)[:nonzeros]] = torch.randn(nonzeros, generator=generator, dtype=torch.float64) + 2
    indices, coefficients = orthogonal_matching_pursuit(codes @ dictionary, dictionary, nonzeros)
    found = torch.zeros_like(codes).scatter(1, indices, coefficients)
    torch.testing.assert_close(found, codes, atol=1e-8, rtol=0)


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
@pytest.mark.parametrize("with_statistics", [False, True])
def test_full_budget_reproduces_the_weight(shape, with_statistics):
    # A budget that pays for dense codes over a complete dictionary (k = s = in) must reproduce W.
    out_features, in_features = shape
    rank = -(-(in_features * in_features * 4 + out_features * in_features * 6) // ((out_features + in_features) * 4))
    assert dictionary_shape(out_features, in_features, rank, in_features, value_bytes=4) >= (in_features, in_features)
    weight = torch.randn(*shape)
    stats = input_statistics(in_features) if with_statistics else None
    factors = factorize(weight, stats, rank, DictionaryConfig(nonzeros=in_features, iterations=1))
    torch.testing.assert_close(factors.dense(), weight.double(), atol=1e-6, rtol=0)


def test_planted_dictionary_beats_svd_at_the_same_budget():
    weight = sparse_dictionary_weight(96, 64, num_atoms=40, nonzeros=4, generator=torch.Generator().manual_seed(0))
    rank = 20  # 20·160 float32 values buy 4 codes of 6 bytes per row plus 41 atoms of 64 values
    assert dictionary_shape(96, 64, rank, 4, value_bytes=4) == (41, 4)
    factors = factorize(weight.float(), None, rank, DictionaryConfig(nonzeros=4, iterations=10))
    assert isinstance(factors, DictionaryFactors)
    assert (weight - factors.dense()).norm() < 0.85 * (weight - truncated_svd(weight, rank).dense()).norm()


def test_learning_improves_on_the_svd_start():
    weight = sparse_dictionary_weight(96, 64, num_atoms=40, nonzeros=4, generator=torch.Generator().manual_seed(1))
    errors = [(weight - learn_dictionary(weight, 41, 4, steps).dense()).norm() for steps in (0, 10)]
    assert errors[1] < 0.7 * errors[0]


@pytest.mark.parametrize("with_statistics", [False, True])
def test_never_worse_than_the_svd_it_would_replace(with_statistics):
    weight = torch.randn(48, 32)  # flat spectrum, no dictionary structure: the fallback must catch it
    stats = input_statistics(32) if with_statistics else None
    factors = factorize(weight, stats, 8, DictionaryConfig())
    if with_statistics:
        assert output_error(weight, factors.dense(), stats.xtx) <= output_error(weight, whitened_svd(weight, stats.xtx, 8).dense(), stats.xtx) * (1 + 1e-9)
    else:
        assert (weight.double() - factors.dense()).norm() <= (weight.double() - truncated_svd(weight, 8).dense()).norm() * (1 + 1e-12)


def test_codes_stay_sparse_after_whitening():
    weight = sparse_dictionary_weight(64, 32, num_atoms=24, nonzeros=3, generator=torch.Generator().manual_seed(2)).float()
    factors = factorize(weight, input_statistics(32), 10, DictionaryConfig(nonzeros=3, iterations=5))
    assert isinstance(factors, DictionaryFactors) and factors.indices.shape == (64, 3)
    assert (factors.codes() != 0).sum(dim=1).max() <= 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, rank, nonzeros", [((96, 64), 16, 4), ((64, 96), 30, 0.5), ((32, 32), 4, 0.25)])
def test_stored_size_stays_within_the_budget(shape, rank, nonzeros, dtype):
    weight = sparse_dictionary_weight(*shape, num_atoms=48, nonzeros=3, generator=torch.Generator().manual_seed(0)).to(dtype)
    layer = build(factorize(weight, None, rank, DictionaryConfig(nonzeros=nonzeros, iterations=2)), None, dtype)
    if isinstance(layer, DictionaryLinear):
        assert weight_bits(layer) <= budget_bits(*shape, rank, dtype)
        assert (layer.num_atoms, layer.nonzeros) == dictionary_shape(*shape, rank, nonzeros, weight.element_size())
    else:
        assert isinstance(layer, LowRankLinear) and layer.rank == rank


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_applies_its_dense_weight(dtype):
    factors = factorize(sparse_dictionary_weight(24, 16, 10, 2, torch.Generator().manual_seed(0)).float(), None, 6, DictionaryConfig(nonzeros=2))
    layer = DictionaryLinear.from_factors(factors, torch.randn(24), dtype)
    x = torch.randn(3, 5, 16, dtype=dtype)
    expected = x.float() @ layer.to_dense().float().T + layer.bias.float()
    torch.testing.assert_close(layer(x).float(), expected, atol=1e-4 if dtype == torch.float32 else 0.1, rtol=1e-2)
    layer(x).sum().backward()
    assert layer.code_values.grad.abs().sum() > 0 and layer.atoms.weight.grad.abs().sum() > 0
    assert "nonzeros=2" in repr(layer) and layer.spec() == {"num_atoms": layer.num_atoms, "nonzeros": 2}


def dictionary_weight(out_features, in_features, generator):
    return 0.05 * sparse_dictionary_weight(out_features, in_features, 2 * in_features, 2, generator, dtype=torch.float32)


@pytest.mark.parametrize("family, dtype", [("llama", torch.float32), ("gpt2", torch.bfloat16), ("qwen2", torch.float32)])
def test_compress_save_load_gives_the_same_logits(tmp_path, family, dtype):
    model, loaded, report = compress_save_load(tmp_path, family, "dictionary", DictionaryConfig(nonzeros=2), make_weight=dictionary_weight, dtype=dtype)
    assert "DictionaryLinear" in {spec["structure"] for spec in report.modules.values()}
    assert_same_logits(model, loaded)


def test_cli_compress(tmp_path, capsys):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "compressed"
    code = run(["compress", str(tmp_path / "tiny"), "--method", "dictionary", "--ratio", "0.5", "--option", "nonzeros=3", "--option", "iterations=1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert lowrank.load(out, return_report=True)[1].method_config["nonzeros"] == 3
