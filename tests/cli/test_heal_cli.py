"""``lowrank heal`` end to end on the reference model: compress (and heal, `--heal-steps`), heal a few steps, load the output;
an interrupted run resumes from its work directory; bad input is one line."""

from __future__ import annotations

import json

import pytest
import torch
from shared_data import CALIB, EVAL, needs_shared
from shared_data import FIXTURE as DENSE

import lowrank
from lowrank.cli.heal import default_work_dir
from lowrank.cli.main import run

QUICK = ["--steps", "3", "--batch-size", "2", "--seq-len", "32", "--top-k", "16", "--checkpoint-every", "2", "--validation-windows", "0"]


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    """The first 20,000 characters of the calibration text (tokenizing all of it would take most of the test)."""
    if not CALIB.is_file():
        pytest.skip(f"calibration text not found at {CALIB}")
    path = tmp_path_factory.mktemp("heal-calib") / "calib.txt"
    path.write_text(CALIB.read_text()[:20_000])
    return path


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory, calib):
    """The reference model with its first block compressed (svd, 0.4) and healed 2 steps by `compress --heal-steps`."""
    out = tmp_path_factory.mktemp("heal-cli") / "svd-40"
    compress = ["compress", str(DENSE), "--method", "svd", "--ratio", "0.4", "--include", r"layers\.0\.", "--out", str(out)]
    assert run([*compress, "--heal-steps", "2", "--calib", str(calib), "--num-samples", "2", "--seq-len", "32"]) == 0
    return out


@needs_shared
def test_heal_writes_a_model_that_loads_and_differs_from_the_compressed_one(compressed_dir, calib, tmp_path, capsys):
    out = tmp_path / "healed"
    arguments = ["heal", str(compressed_dir), "--teacher", str(DENSE), "--calib", str(calib), "--out", str(out), *QUICK]
    assert run([*arguments, "--eval", str(EVAL), "--eval-windows", "1", "--hard-weight", "0.25"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "KL to teacher" in printed and "compressed" in printed and "healed model saved" in printed
    assert not default_work_dir(out).exists(), "the work directory is removed after success"
    assert json.loads((out / "heal.json").read_text())["heal"]["hard_weight"] == 0.25
    ids = torch.arange(40)[None]
    with torch.no_grad():
        healed = lowrank.load(out)(input_ids=ids).logits
        before = lowrank.load(compressed_dir)(input_ids=ids).logits
    assert (healed - before).abs().max() > 1e-5, "three steps of healing must change the model"
    assert run(arguments) == 2 and "--overwrite" in capsys.readouterr().err


@needs_shared
def test_early_stopping_measures_held_out_windows_of_the_calibration_text_and_records_the_kept_step(compressed_dir, calib, tmp_path, capsys):
    out = tmp_path / "healed"
    arguments = ["heal", str(compressed_dir), "--teacher", str(DENSE), "--calib", str(calib), "--out", str(out), *QUICK]
    assert run([*arguments[:-2], "--validation-windows", "2", "--eval-every", "1"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "held-out KL" in printed and "kept step" in printed
    record = json.loads((out / "heal.json").read_text())
    steps, kls = zip(*record["validation"])
    assert list(steps) == [0, 1, 2, 3]
    assert record["best_step"] == steps[kls.index(min(kls))]  # the lowest held-out KL is the one kept
    assert not default_work_dir(out).exists()


@needs_shared
def test_a_rerun_resumes_from_the_checkpoint_the_first_run_left(compressed_dir, calib, tmp_path, capsys):
    # A first run stopped after its checkpoint at step 2 (what an interrupted run leaves): made with
    # the library on the same windows, teacher name and work directory the command uses.
    from lowrank.calibration import read_text, sample_windows, tokenize_stream
    from lowrank.models import load_pretrained, load_tokenizer
    from lowrank.train.heal import HealConfig, build_teacher_cache, heal

    out, work = tmp_path / "healed", tmp_path / "work"
    tokenizer = load_tokenizer(compressed_dir)
    windows = sample_windows(tokenize_stream(tokenizer, read_text(calib)), 3 * 2, 32, 0)
    cache = build_teacher_cache(
        load_pretrained(DENSE), windows, work / "teacher", top_k=16, batch_size=2, teacher_name=str(DENSE.resolve()), progress=False
    )
    config = HealConfig(steps=3, batch_size=2, seq_len=32, top_k=16, warmup_steps=3, checkpoint_every=2)
    heal(lowrank.load(compressed_dir), cache, config, work_dir=work, progress=False, until=2)

    arguments = ["heal", str(compressed_dir), "--teacher", str(DENSE), "--calib", str(calib), "--out", str(out), "--work-dir", str(work), *QUICK]
    assert run(arguments) == 0, capsys.readouterr().err
    assert "resumed at 2" in capsys.readouterr().out
    assert not work.exists()


@needs_shared
@pytest.mark.parametrize(
    "change,message",
    [
        (lambda args, tmp: args.__setitem__(1, str(DENSE)), "not a compressed model"),
        (lambda args, tmp: args.__setitem__(args.index("--teacher") + 1, str(tmp / "missing")), "missing"),
        (lambda args, tmp: args.__setitem__(args.index("--calib") + 1, str(tmp / "none.txt")), "does not exist"),
        (lambda args, tmp: args.extend(["--lr", "0"]), "learning rate"),
        (lambda args, tmp: args.extend(["--hard-weight", "2"]), "hard_weight must lie in [0, 1]"),
        (lambda args, tmp: args.extend(["--work-dir", str(tmp / "healed" / "work")]), "inside --out"),
    ],
    ids=["dense-input", "missing-teacher", "missing-calib", "zero-lr", "hard-weight", "work-dir-in-out"],
)
def test_heal_user_errors_are_one_line(change, message, compressed_dir, calib, tmp_path, capsys):
    arguments = ["heal", str(compressed_dir), "--teacher", str(DENSE), "--calib", str(calib), "--out", str(tmp_path / "healed"), *QUICK]
    change(arguments, tmp_path)
    assert run(arguments) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1, error


@needs_shared
def test_compress_heal_steps_heals_the_output_in_place(compressed_dir, capsys):
    assert json.loads((compressed_dir / "heal.json").read_text())["heal"]["steps"] == 2
    assert sorted(path.name for path in compressed_dir.parent.iterdir()) == ["svd-40"], "no staged or work directory is left behind"
    compress = ["compress", str(DENSE), "--method", "svd", "--out", str(compressed_dir), "--overwrite"]
    assert run([*compress, "--heal-steps", "2"]) == 2
    assert "--heal-steps needs" in capsys.readouterr().err
