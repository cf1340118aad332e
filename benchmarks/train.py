"""Training from scratch with less optimizer memory: AdamW vs GradientProjectionAdamW (GaLore; SVD,
randomized SVD and DCT bases) vs the galore-torch package vs SLTrain layers, in one run.

Run: python benchmarks/train.py   (needs `pip install galore-torch==1.0`, the `bench` extra)
Writes benchmarks/results/train.md. Every method trains the fixture's architecture (built from its
config.json, same seed) on the same batches of ../shared/data/pycode-calib.txt. All methods train
in one process, one step of each in turn, so that load from other jobs on this shared 2-core
machine hits them alike; the peak memory of each is measured apart, in a fresh process of its own.
Compare the ratios of one run, not absolute times.
"""

from __future__ import annotations

import os

# Before torch starts: OpenMP threads spin-waiting on a busy machine made factorizations up to 40× slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import multiprocessing
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB as TEXT  # noqa: E402
from common import EVAL as EVAL_TEXT  # noqa: E402
from common import FIXTURE, REPO, RESULTS  # noqa: E402

RESULT = RESULTS / "train.md"

RANK = 64  # hidden size / 4
STEPS, BATCH_SIZE, SEQ_LEN = 30, 4, 128
UPDATE_PROJ_GAP = 10
LR = 3e-3
COMMON = dict(steps=STEPS, batch_size=BATCH_SIZE, seq_len=SEQ_LEN, lr=LR, warmup_steps=5, log_every=STEPS, seed=0)
METHODS = {
    "AdamW": dict(optimizer="adamw"),
    "projected, SVD (ours)": dict(optimizer="projected", proj_type="svd"),
    "projected, randomized SVD (ours)": dict(optimizer="projected", proj_type="randomized_svd"),
    "projected, DCT (ours)": dict(optimizer="projected", proj_type="dct"),
    "galore-torch 1.0 GaLoreAdamW": dict(optimizer="galore-torch"),
    "SLTrain + AdamW": dict(optimizer="adamw", parameterization="sltrain", sltrain_rank=RANK, density=0.03),
}


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def galore_torch_optimizer(model):
    from galore_torch import GaLoreAdamW

    from lowrank.train import projected_parameter_groups

    matrices, others = projected_parameter_groups(model, RANK)
    matrices = {"params": matrices["params"], "rank": RANK, "update_proj_gap": UPDATE_PROJ_GAP, "scale": 1.0, "proj_type": "std"}
    return GaLoreAdamW([matrices, {"params": others["params"]}], lr=LR, no_deprecation_warning=True)


def state_bytes(optimizer) -> int:
    """Tensor bytes of the optimizer state; galore-torch keeps its basis inside a projector object."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            tensor = getattr(value, "ortho_matrix", value)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def build(name: str):
    """The model, optimizer and config of one method (same seed: same initial weights for the dense part)."""
    from lowrank.train import PretrainConfig, build_optimizer, model_from_config, prepare_model_

    options = dict(METHODS[name])
    use_galore_torch = options["optimizer"] == "galore-torch"
    if use_galore_torch:
        options["optimizer"] = "adamw"  # placeholder: the optimizer is built below, the rest of the config is used
    config = PretrainConfig(**COMMON, rank=RANK, update_proj_gap=UPDATE_PROJ_GAP, scale=1.0, **options)
    model = prepare_model_(model_from_config(FIXTURE, seed=0), config)
    optimizer = galore_torch_optimizer(model) if use_galore_torch else build_optimizer(model, config)
    return model, optimizer, config


def peak_memory(name: str, tokens_file: str, results) -> None:
    """In a fresh process: resident memory growth over two training steps (optimizer state created, one basis refresh)."""
    from lowrank.train import pretrain

    torch.set_num_threads(1)
    model, optimizer, config = build(name)
    config.steps = 2
    tokens = torch.load(tokens_file, weights_only=True)
    baseline = resident_bytes()
    pretrain(model, tokens, config, optimizer=optimizer, on_log=lambda step, loss: None)
    results.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline)


def train_all(token_ids: torch.Tensor, eval_ids: torch.Tensor) -> list[dict]:
    """Train every method in this process, one step of each in turn, so that load from other jobs hits all alike."""
    from lowrank.train.pretrain import learning_rate_factor, training_batch

    runs = {name: build(name) for name in METHODS}
    seconds = dict.fromkeys(METHODS, 0.0)
    losses: dict[str, list[float]] = {name: [] for name in METHODS}
    for model, _, _ in runs.values():
        # One forward and backward pass first, so that one-time start-up costs do not count as training time.
        warm = token_ids[: 2 * SEQ_LEN].view(2, SEQ_LEN)
        model(input_ids=warm, labels=warm).loss.backward()
        model.zero_grad(set_to_none=True)
    for step in range(STEPS):
        batch = training_batch(token_ids, step, BATCH_SIZE, SEQ_LEN, seed=0)
        for name, (model, optimizer, config) in runs.items():
            for group in optimizer.param_groups:
                group["lr"] = LR * learning_rate_factor(step, config.warmup_steps, STEPS)
            start = time.perf_counter()
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds[name] += time.perf_counter() - start
            losses[name].append(float(loss.detach()))
        print(f"step {step + 1}: " + ", ".join(f"{losses[name][-1]:.3f}" for name in METHODS), flush=True)
    windows = eval_ids[: 8 * SEQ_LEN].view(8, SEQ_LEN)
    measured = []
    for name, (model, optimizer, _) in runs.items():
        model.eval()
        with torch.no_grad():
            eval_loss = float(model(input_ids=windows, labels=windows).loss)
        measured.append(dict(
            name=name, loss=sum(losses[name][-5:]) / 5, eval_loss=eval_loss, state=state_bytes(optimizer),
            tokens_per_second=STEPS * BATCH_SIZE * SEQ_LEN / seconds[name], step_seconds=seconds[name] / STEPS,
            parameters=sum(p.numel() for p in model.parameters()),
        ))  # fmt: skip
    return measured


def refresh_seconds(shapes: list[tuple[int, int]]) -> dict[str, float]:
    """Time to choose the bases of all the model's matrices once, per basis type (best of 3, interleaved)."""
    from lowrank.train.projection import dct_matrix, projection_side, randomized_svd_basis, select_dct_columns, svd_basis

    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=generator) for shape in shapes]
    dcts = {size: dct_matrix(size) for size in {min(shape) for shape in shapes}}
    kinds = {
        "svd": lambda grad, side: svd_basis(grad, RANK, side),
        "randomized_svd": lambda grad, side: randomized_svd_basis(grad, RANK, side, torch.Generator().manual_seed(0)),
        "dct": lambda grad, side: select_dct_columns(grad, dcts[min(grad.shape)], RANK, side),
    }
    best = {kind: float("inf") for kind in kinds}
    for _ in range(3):
        for kind, choose in kinds.items():
            start = time.perf_counter()
            for grad in grads:
                choose(grad, projection_side(grad.shape))
            best[kind] = min(best[kind], time.perf_counter() - start)
    return best


def markdown(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def main() -> None:
    try:
        import galore_torch  # noqa: F401
    except ImportError:
        sys.exit("galore-torch is not installed: pip install galore-torch==1.0 (the `bench` extra)")
    from lowrank.calibration import read_text
    from lowrank.calibration.data import tokenize_stream
    from lowrank.models import load_tokenizer
    from lowrank.train import model_from_config

    began = time.perf_counter()
    tokenizer = load_tokenizer(FIXTURE)
    tokens = {"train": tokenize_stream(tokenizer, read_text(TEXT)), "eval": tokenize_stream(tokenizer, read_text(EVAL_TEXT)[:200_000])}
    torch.set_num_threads(1)  # other jobs share the 2 cores: one thread per process times steadily
    tokens_file = REPO / "benchmarks" / "results" / ".train-tokens.pt"
    torch.save(tokens["train"], tokens_file)
    context = multiprocessing.get_context("spawn")
    peaks = {}
    try:
        for name in METHODS:
            results = context.Queue()
            process = context.Process(target=peak_memory, args=(name, str(tokens_file), results))
            process.start()
            peaks[name] = results.get()
            process.join()
    finally:
        tokens_file.unlink(missing_ok=True)
    measured = train_all(tokens["train"], tokens["eval"])
    for m in measured:
        m["peak_above_start"] = peaks[m["name"]]

    shapes = [tuple(p.shape) for p in model_from_config(FIXTURE).parameters() if p.ndim == 2]
    refresh = refresh_seconds(shapes)
    adamw, svd, dct = measured[0], measured[1], measured[3]
    minutes = (time.perf_counter() - began) / 60
    rows = [
        [m["name"], f"{m['loss']:.3f}", f"{m['eval_loss']:.3f}", f"{m['parameters'] / 1e6:.2f} M", f"{m['state'] / 2**20:.1f}",
         f"{m['state'] / adamw['state']:.0%}", f"{m['peak_above_start'] / 2**20:.0f}", f"{m['tokens_per_second']:.0f}",
         f"{m['step_seconds'] / adamw['step_seconds']:.2f}"]
        for m in measured
    ]  # fmt: skip
    headers = ["method", "train loss (last 5)", "eval loss", "trainable", "optimizer state MB", "state / AdamW",
               "peak RSS above start MB", "tokens/s", "step time / AdamW"]  # fmt: skip
    text = f"""# Training from scratch: optimizer state and speed

Fixture architecture (Llama, 6 layers, hidden 256, 7.2 M parameters) trained from scratch, same seed and batches, on
`pycode-calib.txt`: {STEPS} steps × {BATCH_SIZE} × {SEQ_LEN} tokens = {STEPS * BATCH_SIZE * SEQ_LEN:,} tokens per method, learning
rate {LR} (5 warm-up steps, cosine), CPU with 1 thread, the methods trained one step each in turn in one process
(`python benchmarks/train.py`, {minutes:.1f} minutes in all). Peak RSS: growth of resident memory over the first 2 steps
(optimizer state created, one basis refresh), each method in a fresh process.
Projected optimizers: rank {RANK} (hidden / 4) on every weight matrix including the tied embedding, basis refreshed every
{UPDATE_PROJ_GAP} steps, scale 1. SLTrain: block linears as rank-{RANK} + 3 % sparse, embedding dense, AdamW. Eval loss: 8
windows of {SEQ_LEN} tokens of `pycode-eval.txt`. The machine is shared (2 cores, other jobs running): absolute tokens/s
are noisy, ratios within this run are what to compare.

{markdown(headers, rows)}

Optimizer state at rank {RANK}: SVD variant {svd['state'] / adamw['state']:.0%} of AdamW's, DCT variant
{dct['state'] / adamw['state']:.0%} (target ≤ 35 %). Step time DCT / SVD: {dct['step_seconds'] / svd['step_seconds']:.2f}.

Choosing the bases of all {len(shapes)} matrices once (random gradients of the model's shapes, best of 3, interleaved):

{markdown(["basis", "seconds per refresh", "/ SVD"], [[kind, f"{seconds:.3f}", f"{seconds / refresh['svd']:.2f}"] for kind, seconds in refresh.items()])}
"""
    RESULT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
