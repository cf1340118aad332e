"""``lowrank heal``: distil the dense model into a compressed model's factors (resumable)."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path
from typing import Annotated

import typer

from ..errors import LowrankError
from .common import Overwrite, TrustRemoteCode, check_device, check_positive, format_table, input_model, megabytes
from .main import app


def default_work_dir(out: Path) -> Path:
    """Where a run keeps its teacher cache and checkpoint unless ``--work-dir`` is given: a hidden sibling of ``--out``."""
    return out.parent / f".{out.name}.heal-work"


@app.command()
def heal(
    model_dir: Annotated[Path, typer.Argument(help="Compressed model directory (written by `lowrank compress`).", show_default=False)],
    teacher: Annotated[Path, typer.Option(help="The dense model it was compressed from (the distillation teacher).", show_default=False)],
    calib: Annotated[Path, typer.Option(help="UTF-8 training text; windows are sampled at seeded random offsets.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory for the healed model.", show_default=False)],
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Windows per step.")] = 8,
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 128,
    lr: Annotated[
        float, typer.Option(help="Peak AdamW learning rate (linear warm-up, cosine decay to 10 %); above ~2e-4 low-rank factors drift before they heal.")
    ] = 1e-4,
    warmup_steps: Annotated[int, typer.Option(help="Steps of linear warm-up.")] = 10,
    top_k: Annotated[int, typer.Option(help="Teacher tokens cached per position (the rest is one tail outcome of the KL).")] = 64,
    temperature: Annotated[float, typer.Option(help="Softens teacher and student alike; the loss is scaled by its square.")] = 1.0,
    norms: Annotated[bool, typer.Option(help="Also train the normalization layers' weights (the factors always train).")] = True,
    hard_weight: Annotated[
        float, typer.Option(help="Weight α of the next-token cross-entropy on the training text: loss = (1 − α)·KL + α·cross-entropy (0: pure distillation).")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the window sampling (and dropout).")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints in the work directory.")] = 50,
    validation_windows: Annotated[
        int,
        typer.Option(
            help="Early stopping: hold out the last part of --calib (never trained on), measure the KL to the teacher on this many "
            "windows of it before training and every --eval-every steps, and keep the best parameters (0: off, train on all of --calib)."
        ),
    ] = 16,
    eval_every: Annotated[int, typer.Option(help="Steps between the held-out measurements of --validation-windows.")] = 50,
    work_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where the teacher cache and checkpoints go (default: .OUT.heal-work beside --out); an interrupted run resumes from it "
            "when the same command runs again; removed after success.",
            show_default=False,
        ),
    ] = None,
    eval: Annotated[
        Path | None, typer.Option("--eval", help="Held-out UTF-8 text: print the perplexity of teacher, compressed and healed model.")
    ] = None,
    eval_windows: Annotated[int, typer.Option(help="256-token windows of --eval to evaluate.")] = 32,
    device: Annotated[str, typer.Option(help="Device to train on (cpu, cuda).")] = "cpu",
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Heal a compressed model: fine-tune its factors (and norms) to match the dense model's next-token distributions."""
    import lowrank
    from lowrank.calibration import read_text, sample_windows, tokenize_stream
    from lowrank.calibration.data import consecutive_windows
    from lowrank.io import check_output
    from lowrank.io.load import read_lowrank_config
    from lowrank.io.paths import write_text_atomic
    from lowrank.models import load_tokenizer
    from lowrank.train.heal import CHECKPOINT, HealConfig, build_teacher_cache, find_teacher_cache, split_tokens
    from lowrank.train.heal import heal as heal_model

    # Cheap checks first, so a typo fails in a second rather than after the teacher pass.
    check_positive(steps=steps, batch_size=batch_size, top_k=top_k, checkpoint_every=checkpoint_every, eval_windows=eval_windows, eval_every=eval_every)
    if validation_windows < 0:
        raise LowrankError(f"--validation-windows must be ≥ 0 (0: no early stopping), got {validation_windows}")
    check_device(device)
    config = HealConfig(
        steps=steps, batch_size=batch_size, seq_len=seq_len, learning_rate=lr, warmup_steps=min(warmup_steps, steps), temperature=temperature,
        top_k=top_k, train_norms=norms, hard_weight=hard_weight, seed=seed, checkpoint_every=checkpoint_every, eval_every=eval_every if validation_windows else 0,
    )  # fmt: skip
    config.validate()
    source, model_dir = model_dir, input_model(model_dir, trust_remote_code)
    if read_lowrank_config(model_dir) is None:
        raise LowrankError(f"{str(source)!r} is not a compressed model (no lowrank_config.json); compress it first with `lowrank compress`")
    teacher_source, teacher_dir = teacher, input_model(teacher, trust_remote_code)
    inputs = [source, model_dir, teacher_source, teacher_dir, calib] + ([eval] if eval is not None else [])
    out_path = check_output(out, inputs, overwrite)
    work = check_output(work_dir if work_dir is not None else default_work_dir(out_path), inputs, overwrite=True, option="--work-dir")
    if work == out_path or out_path in work.parents:
        raise LowrankError(f"--work-dir {str(work)!r} lies inside --out, which is replaced at the end; choose a path outside it")
    text = read_text(calib)
    eval_text = read_text(eval) if eval is not None else None
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise LowrankError(f"{source} has no tokenizer files; healing on text needs the model's tokenizer")

    def perplexity(model) -> float:
        return lowrank.perplexity(model, tokenizer, eval_text, max_windows=eval_windows, progress=False)

    token_ids = tokenize_stream(tokenizer, text)
    held_out = None
    if validation_windows:
        # The tail of --calib, as long as the validation windows (at most half the text): no training window overlaps it.
        fraction = min(validation_windows * seq_len / max(token_ids.numel(), 1), 0.5)
        token_ids, tail = split_tokens(token_ids, fraction)
        if tail.numel() < seq_len or token_ids.numel() < seq_len:
            raise LowrankError(f"{calib} is too short to hold out {validation_windows} windows of {seq_len} tokens; pass --validation-windows 0 or a longer text")
        held_out = consecutive_windows(tail, seq_len, validation_windows)
    windows = sample_windows(token_ids, steps * batch_size, seq_len, seed)
    teacher_name = str(teacher_dir.resolve())
    cache = find_teacher_cache(work / "teacher", windows, top_k, temperature, teacher_name)
    validation = find_teacher_cache(work / "validation", held_out, top_k, temperature, teacher_name) if held_out is not None else None
    teacher_perplexity = None
    if cache is None or (held_out is not None and validation is None):  # a resumed run that finds its caches never loads the teacher
        dense = lowrank.load(teacher_dir, device=device, trust_remote_code=trust_remote_code)
        teacher_perplexity = perplexity(dense) if eval_text is not None else None
        cache = build_teacher_cache(
            dense, windows, work / "teacher", top_k=top_k, temperature=temperature, batch_size=batch_size, teacher_name=teacher_name
        )
        if held_out is not None:
            validation = build_teacher_cache(
                dense, held_out, work / "validation", top_k=top_k, temperature=temperature, batch_size=batch_size, teacher_name=teacher_name
            )
        del dense
        gc.collect()  # the teacher leaves memory before the student arrives

    student, report = lowrank.load(model_dir, device=device, trust_remote_code=trust_remote_code, return_report=True)
    if cache.meta.get("vocab_size") not in (None, student.get_output_embeddings().weight.shape[0]):
        raise LowrankError(
            f"the teacher's vocabulary ({cache.meta['vocab_size']} tokens) is not the compressed model's; pass the dense model it was compressed from"
        )
    before = perplexity(student) if eval_text is not None else None
    try:
        history = heal_model(student, cache, config, work_dir=work, validation=validation)
    except KeyboardInterrupt:
        raise LowrankError(f"interrupted; run the same command again to resume from the last checkpoint in {work}") from None
    lowrank.save(student, out_path, report=report, tokenizer=tokenizer, overwrite=overwrite)
    record = {
        "heal": {**config.__dict__, "validation_windows": validation_windows},
        "model": str(source),
        "teacher": str(teacher_source),
        "calib": str(calib),
        "losses": history.losses,
        "validation": history.validation,
        "best_step": history.best_step,
    }
    write_text_atomic(out_path / "heal.json", json.dumps(record, indent=2) + "\n")
    after = perplexity(student) if eval_text is not None else None
    shutil.rmtree(work / "teacher", ignore_errors=True)
    shutil.rmtree(work / "validation", ignore_errors=True)
    (work / CHECKPOINT).unlink(missing_ok=True)
    if work.is_dir() and not any(work.iterdir()):
        work.rmdir()

    first, last = history.mean_loss(first=min(10, steps)), history.mean_loss(last=min(10, steps))
    headers = ["steps", "trainable parameters", "AdamW state", "KL to teacher (first 10 → last 10 steps)", "train s"]
    row = [f"{steps}" + (f" (resumed at {history.resumed_from})" if history.resumed_from else ""), f"{history.trainable_parameters:,}"]
    row += [megabytes(history.optimizer_bytes), f"{first:.4f} → {last:.4f}", f"{history.seconds[-1]:.0f}"]
    if history.validation:
        kept = dict(history.validation)[history.best_step]
        headers += ["held-out KL (start → kept)", "kept step"]
        row += [f"{history.validation[0][1]:.4f} → {kept:.4f}", f"{history.best_step}"]
    print(format_table(headers, [row]))
    if eval_text is not None:
        dense_cell = f"{teacher_perplexity:.2f}" if teacher_perplexity is not None else "— (cache reused)"
        print(
            format_table(
                [f"perplexity on {eval.name} ({eval_windows} windows)", "teacher", "compressed", "healed"],
                [["", dense_cell, f"{before:.2f}", f"{after:.2f}"]],
            )
        )
    print(f"healed model saved to {out} (load with lowrank.load)")


def heal_in_place(out: Path, teacher: Path, calib: Path, steps: int, device: str = "cpu", trust_remote_code: bool = False) -> None:
    """``lowrank compress --heal-steps N``: heal the compressed model just written to ``out`` with
    ``lowrank heal``'s defaults (teacher: the input model; text: ``--calib``), into a hidden sibling
    that then replaces ``out``: an interruption leaves the unhealed ``out`` intact."""
    import os

    from lowrank.io.paths import replace_directory

    staged = out.parent / f".{out.name}.healed-{os.getpid()}"
    heal(out, teacher, calib, staged, steps=steps, device=device, overwrite=True, trust_remote_code=trust_remote_code)
    replace_directory(staged, out)
