import math

import pytest
import torch

import lowrank
from lowrank.analysis import analyze, summary
from lowrank.analysis.spectra import spectrum_metrics
from lowrank.linalg import output_error, rank_for_ratio, whitened_svd

WEIGHTWATCHER_COLUMNS = ["alpha", "alpha_weighted", "stable_rank", "log_spectral_norm"]


def test_one_row_per_block_linear_with_the_issue_columns(tiny_llama):
    table = analyze(tiny_llama, progress=False)
    assert list(table["name"]) == lowrank.find_targets(tiny_llama)
    for column in ["name", "module", "out_features", "in_features", "parameters", "spectral_norm", "nuclear_norm", "frobenius_norm",
                   "effective_rank", "rank_90", "rank_99", "alpha_debiased", "welore_rank", "welore_low_rank", *WEIGHTWATCHER_COLUMNS]:  # fmt: skip
        assert column in table, column
    row = table.iloc[0]
    weight = tiny_llama.get_submodule(row["name"]).weight
    expected = spectrum_metrics(torch.linalg.svdvals(weight.double()))
    assert row["stable_rank"] == pytest.approx(expected["stable_rank"])
    assert row["parameters"] == weight.numel() and row["layer"] == 0 and row["kind"] == "self_attn.q_proj"
    assert row["log_spectral_norm"] == pytest.approx(math.log10(expected["spectral_norm"] ** 2))
    assert row["alpha_weighted"] == pytest.approx(row["alpha"] * row["log_spectral_norm"])


def test_gpt2_conv1d_weights_are_read_as_out_by_in():
    from tiny_models import tiny_model

    table = analyze(tiny_model("gpt2"), progress=False)
    fused_qkv = table[table["kind"] == "attn.c_attn"].iloc[0]
    assert (fused_qkv["out_features"], fused_qkv["in_features"]) == (96, 32)


def test_tied_embeddings_are_analyzed_once(dense_model):
    table = analyze(dense_model, embeddings=True, include=[r"layers\.0\.mlp\.up_proj"], progress=False)
    assert list(table["name"]) == ["model.layers.0.mlp.up_proj", "model.embed_tokens"]
    assert table.iloc[1]["module"] == "Embedding" and table.iloc[1]["out_features"] == 8192


def test_predicted_output_error_is_the_error_of_the_whitened_factorization(dense_model, fixture_stats):
    names = [r"layers\.1\.self_attn\.o_proj", r"layers\.1\.mlp\.down_proj"]
    table = analyze(dense_model, stats=fixture_stats, include=names, progress=False)
    for _, row in table.iterrows():
        assert row["relative_output_error_0.2"] < row["relative_output_error_0.4"] < row["relative_output_error_0.6"] < 1
        assert row["whitened_rank_90"] <= row["whitened_rank_99"]
        weight = dense_model.get_submodule(row["name"]).weight
        covariance = fixture_stats[row["name"]].covariance
        rank = rank_for_ratio(*weight.shape, 0.4)
        assert row["rank_at_0.4"] == rank
        actual = output_error(weight, whitened_svd(weight, covariance, rank).dense(), covariance)
        assert row["output_error_0.4"] == pytest.approx(actual, rel=1e-6)


def test_summary_averages_the_weightwatcher_metrics(tiny_llama):
    table = analyze(tiny_llama, progress=False)
    means = summary(table)
    for metric in WEIGHTWATCHER_COLUMNS:
        assert means[metric] == pytest.approx(table[metric].mean())
    assert 0 <= means["welore_low_rank_fraction"] <= 1


def test_threads_setting_is_restored(tiny_llama):
    before = torch.get_num_threads()
    analyze(tiny_llama, progress=False, num_threads=1)
    assert torch.get_num_threads() == before
