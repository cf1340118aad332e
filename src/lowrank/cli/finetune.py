"""``lowrank finetune`` (adapters, WeLore or full training on a text file) and ``lowrank merge-peft``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer

from ..errors import LowrankError
from .common import Overwrite, TrustRemoteCode, check_device, check_patterns, check_positive, format_table, input_model, megabytes
from .main import app

WHOLE_MODEL_INITS = ("welore", "full")
EXPORTS = ("original", "residual")


@app.command()
def finetune(
    model_dir: Annotated[Path, typer.Argument(help="Model directory: dense Hugging Face or compressed by `lowrank compress`.", show_default=False)],
    data: Annotated[Path, typer.Option(help="UTF-8 training text; windows are sampled at seeded random offsets.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (a PEFT adapter, or a model for welore/full).", show_default=False)],
    init: Annotated[str, typer.Option(help="principal, minor, covariance, singular-value, random (adapters); welore (train the factors of a compressed model); full.")] = "principal",
    rank: Annotated[int, typer.Option(help="Adapter rank r (singular-value: number of tuned singular values and LoRA rank).")] = 8,
    mode: Annotated[str, typer.Option(help="covariance init: knowledge (adapt the bottom-r, forgets less) or instruction (adapt the top-r).")] = "knowledge",
    svd: Annotated[str, typer.Option(help="exact, or randomized (top components only: principal, covariance --mode instruction, singular-value).")] = "exact",
    power_iterations: Annotated[int, typer.Option(help="Power iterations of the randomized SVD (4 ≈ exact).")] = 4,
    calib: Annotated[Path | None, typer.Option(help="UTF-8 text for the covariance init's input covariance (required by --init covariance).")] = None,
    num_samples: Annotated[int, typer.Option(help="Calibration windows of --calib.")] = 32,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Windows per step.")] = 8,
    seq_len: Annotated[int, typer.Option(help="Tokens per window (training and calibration).")] = 128,
    lr: Annotated[float | None, typer.Option(help="Peak AdamW learning rate; default 1e-3 for adapters, 1e-4 for welore and full.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of window sampling and random initializations.")] = 0,
    include: Annotated[list[str] | None, typer.Option(help="Regex of layer names to adapt (repeatable); default: every linear layer in the blocks.")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Regex of layer names not to adapt (repeatable).")] = None,
    export: Annotated[str, typer.Option(help="Adapters: original (rank-2r PEFT LoRA for the untouched base model, written to --out) or residual (--out/base holds the residual base, --out/adapter a rank-r LoRA).")] = "original",
    device: Annotated[str, typer.Option(help="Device to train on (cpu, cuda).")] = "cpu",
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Fine-tune a model on a text file with a decomposition-initialized adapter, WeLore or fully; save PEFT-loadable output."""
    import lowrank
    from lowrank import adapt
    from lowrank.calibration import read_text
    from lowrank.io import atomic_directory, check_output
    from lowrank.models import load_tokenizer

    # Cheap checks first, so a typo fails in a second rather than after training.
    check_positive(rank=rank, num_samples=num_samples, steps=steps, batch_size=batch_size, seq_len=seq_len)
    check_patterns(include=include, exclude=exclude)
    check_device(device)
    if lr is not None and not 0.0 < lr < float("inf"):
        raise LowrankError(f"--lr must be a positive number, got {lr}")
    source, model_dir = model_dir, input_model(model_dir, trust_remote_code)
    inputs = [source, model_dir, data] + ([calib] if calib is not None else [])
    check_output(out, inputs, overwrite)
    if export not in EXPORTS:
        raise LowrankError(f"unknown --export {export!r}; choose one of: {', '.join(EXPORTS)}")
    config = None
    if init not in WHOLE_MODEL_INITS:
        if init not in adapt.init_names():
            raise LowrankError(f"unknown --init {init!r}; choose one of: {', '.join(adapt.init_names() + list(WHOLE_MODEL_INITS))}")
        options = dict(rank=rank, include=include, exclude=exclude, svd=svd, power_iterations=power_iterations, seed=seed)
        config = adapt.config_class(init)(**options, **({"mode": mode} if init == "covariance" else {}))
        config.validate()
        if config.needs_statistics and calib is None:
            raise LowrankError(f"--init {init} needs calibration text for the input covariance; pass --calib FILE")
    text = read_text(data)
    calib_text = read_text(calib) if calib is not None and config is not None and config.needs_statistics else None
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise LowrankError(f"{model_dir} has no tokenizer files; fine-tuning on text needs the model's tokenizer")

    model, report = lowrank.load(model_dir, device=device, trust_remote_code=trust_remote_code, return_report=True)
    if init == "welore":
        adapt.prepare_welore_(model)
    elif init == "full":
        model.requires_grad_(True)
    else:
        stats = None
        if calib_text is not None:
            targets = lowrank.find_targets(model, include=include, exclude=exclude)
            stats = lowrank.calibrate(model, tokenizer, calib_text, num_samples=num_samples, seq_len=seq_len, seed=seed, targets=targets)
        adapt.adapt_(model, config, stats=stats)
    learning_rate = lr if lr is not None else (1e-4 if init in WHOLE_MODEL_INITS else 1e-3)
    settings = adapt.FinetuneConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, learning_rate=learning_rate, warmup_steps=min(10, steps), seed=seed)
    result = adapt.finetune(model, tokenizer, text, settings)

    if init in WHOLE_MODEL_INITS:
        lowrank.save(model, out, report=report, tokenizer=tokenizer, overwrite=overwrite)
        where = f"model saved to {out} (load with lowrank.load)"
    elif export == "original":
        adapt.export_peft(model, out, against="original", base_model_name_or_path=str(model_dir), overwrite=overwrite)
        where = f"PEFT adapter for the original model saved to {out} (peft.PeftModel.from_pretrained(base, {str(out)!r}))"
    else:
        with atomic_directory(out, overwrite, inputs) as temporary, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # adapt_ already warned that the base changed
            adapt.save_residual_base(model, temporary / "base", report=report, tokenizer=tokenizer)
            adapt.export_peft(model, temporary / "adapter", against="residual", base_model_name_or_path=str(out / "base"))
        where = f"residual base saved to {out / 'base'} and its PEFT adapter to {out / 'adapter'}"

    first, last = result.losses[: min(10, steps)], result.losses[-min(10, steps) :]
    rows = [[init, f"{result.trainable_parameters:,}", megabytes(result.optimizer_bytes), f"{sum(first) / len(first):.3f} → {sum(last) / len(last):.3f}", f"{result.steps_per_second:.2f}"]]
    print(format_table(["init", "trainable parameters", "AdamW state", "loss (first 10 → last 10 steps)", "steps/s"], rows))
    print(where)


@app.command(name="merge-peft")
def merge_peft(
    model_dir: Annotated[Path, typer.Argument(help="The base model the adapter was trained on (dense or compressed).", show_default=False)],
    adapter_dir: Annotated[Path, typer.Argument(help="PEFT LoRA directory (adapter_config.json + adapter_model.safetensors).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory for the merged model.", show_default=False)],
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Import a PEFT LoRA checkpoint into a model, merge it into the weights and save the model."""
    import lowrank
    from lowrank import adapt
    from lowrank.io import check_output
    from lowrank.models import load_tokenizer

    source, model_dir = model_dir, input_model(model_dir, trust_remote_code)
    if not adapter_dir.is_dir():
        raise LowrankError(f"adapter directory {str(adapter_dir)!r} does not exist; pass a PEFT LoRA directory")
    check_output(out, [source, model_dir, adapter_dir], overwrite)
    model, report = lowrank.load(model_dir, trust_remote_code=trust_remote_code, return_report=True)
    names = adapt.import_peft(model, adapter_dir)
    adapt.merge_adapters_(model)
    lowrank.save(model, out, report=report, tokenizer=load_tokenizer(model_dir, trust_remote_code=trust_remote_code), overwrite=overwrite)
    print(f"merged the LoRA of {len(names)} layers from {adapter_dir} into {model_dir}; saved to {out}")
