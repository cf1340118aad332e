"""The command line, run in-process through the same entry point as the ``lowrank`` script."""

import json

from safetensors.torch import load_file, save_file

from shared_data import CALIB, EVAL, needs_shared
from lowrank.cli.main import run


@needs_shared
def test_compress_then_eval(tmp_path, fixture_path, capsys):
    out = tmp_path / "pycode-40"
    code = run(
        [
            "compress", str(fixture_path), "--method", "whiten", "--allocate", "uniform", "--ratio", "0.4", "--calib", str(CALIB),
            "--num-samples", "4", "--seq-len", "64", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "targeted layers" in capsys.readouterr().out
    saved = json.loads((out / "lowrank_config.json").read_text())
    assert saved["method"] == "whiten" and len(saved["modules"]) == 42
    assert run(["eval", str(out), str(fixture_path), "--data", str(EVAL), "--max-windows", "2", "--seq-len", "128", "--no-speed", "--json", str(tmp_path / "r.json")]) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert results[0]["method"] == "whiten" and results[1]["method"] == "dense"
    assert results[0]["parameters"] < results[1]["parameters"]
    assert results[1]["perplexity"] < results[0]["perplexity"] < 2 * results[1]["perplexity"]


def test_eval_measures_speed_interleaved_and_says_how(tmp_path, capsys):
    from tiny_models import tiny_model

    import lowrank

    dense = tiny_model("llama")
    dense.save_pretrained(tmp_path / "dense")
    model = tiny_model("llama")
    report = lowrank.compress_(model, lowrank.allocate(model, 0.4, method="svd"), method="svd", progress=False)
    lowrank.save(model, tmp_path / "svd", report=report)
    code = run(["eval", str(tmp_path / "dense"), str(tmp_path / "svd"), "--rounds", "2", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert "2 interleaved rounds" in out and "1 torch thread" in out
    results = json.loads((tmp_path / "r.json").read_text())
    assert [sorted(result["speed"]) for result in results] == [
        ["bytes_per_token", "decode", "decode_tokens_per_second", "decode_vs_first", "prefill", "prefill_vs_first"]
    ] * 2
    assert results[0]["speed"]["decode_vs_first"].startswith("1 [1–1]")  # the first model is the baseline
    assert results[1]["speed"]["bytes_per_token"] < results[0]["speed"]["bytes_per_token"]


def test_help_lists_every_command(capsys):
    assert run(["--help"]) == 0
    output = capsys.readouterr().out
    for command in ("compress", "eval", "methods", "demo"):
        assert command in output


def nan_model(tmp_path):
    from tiny_models import tiny_model

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "nan-model")
    weights = load_file(tmp_path / "nan-model" / "model.safetensors")
    weights["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("inf")
    save_file(weights, tmp_path / "nan-model" / "model.safetensors", metadata={"format": "pt"})
    return tmp_path / "nan-model"


def bad_inputs(tmp_path):
    fixture = str(CALIB.parents[1] / "fixtures" / "pycode-llama")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("def f():\n    return 1\n")
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "exists").mkdir()
    out = ["--out", str(tmp_path / "new")]
    return {
        "missing model": (["compress", str(tmp_path / "nope"), *out, "--method", "svd"], "does not exist"),
        "not a model": (["compress", str(tmp_path / "not-a-model"), *out, "--method", "svd"], "not a model directory"),
        "ratio too big": (["compress", fixture, *out, "--ratio", "1.0", "--method", "svd"], "--ratio must be in"),
        "negative ratio": (["compress", fixture, *out, "--ratio", "-0.2", "--method", "svd"], "--ratio must be in"),
        "empty calibration": (["compress", fixture, *out, "--calib", str(tmp_path / "empty.txt")], "is empty"),
        "short calibration": (["compress", fixture, *out, "--calib", str(tmp_path / "short.txt")], "fewer than one window"),
        "missing calibration": (["compress", fixture, *out], "default recipe calibrates"),
        "existing output": (["compress", fixture, "--out", str(tmp_path / "exists"), "--method", "svd"], "--overwrite"),
        "include nothing": (["compress", fixture, *out, "--method", "svd", "--include", "nothing_like_this"], "matches no linear layer"),
        "unknown method": (["compress", fixture, *out, "--method", "magic"], "unknown method"),
        "bad option": (["compress", fixture, *out, "--method", "svd", "--option", "speed=fast"], "bad --option"),
        "nan weight": (["compress", str(nan_model(tmp_path)), *out, "--method", "svd"], "model.layers.1.self_attn.o_proj"),
    }


@needs_shared
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, capsys):
    cases = bad_inputs(tmp_path)
    capsys.readouterr()  # drop the progress bars of building the broken model
    for case, (argv, message) in cases.items():
        assert run(argv) == 2, case
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err, (case, err)
        assert len(err.splitlines()) == 1, (case, err)
        assert not (tmp_path / "new").exists(), case
        assert not any(p.name.startswith(".new") for p in tmp_path.iterdir()), case
