"""Block-by-block compression: one transformer block in memory at a time, straight from the shards.

The inputs of every block are recorded once (:mod:`lowrank.blockwise.capture`); then, for each
block in turn: read its weights from the checkpoint, collect its layers' calibration statistics,
factor them, write the block to its own output shard, compute the block's outputs — from the
dense block by default, or from the compressed one so later blocks calibrate on the inputs they
will really see — and free it. Peak memory is one block plus the hidden states of the calibration windows, whatever the
model's size. After every block the hidden states and a progress file are saved, so an interrupted
run continues where it stopped (``resume=True``) and ends with the same output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..allocation import Plan, allocate, strategy_needs_gradients
from ..allocation.allocate import global_plan
from ..calibration import LayerStatistics, load_statistics, save_statistics
from ..compress import FORMAT_VERSION, CompressionReport, cast_, compress_layers_
from ..configs import config_to_dict
from ..errors import LowrankError
from ..io.paths import check_output, replace_directory
from ..io.remote_code import write_remote_code
from ..io.save import LOWRANK_CONFIG
from ..methods import get_method
from ..models import DTYPES
from ..nn import find_blocks, find_targets
from .capture import BlockInputs, capture_block_inputs, run_block
from .checkpoint import CheckpointReader, empty_model, materialize, release, return_freed_memory, tied_keys, write_index, write_shard
from .distributed import Group, StatisticsExchange, collect_pieces, joined

log = logging.getLogger(__name__)

PROPAGATE = ("dense", "compressed")
PROGRESS = "progress.json"
HIDDEN = "hidden.safetensors"
REST = "rest.safetensors"


def single_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's one stack of repeated blocks, or a one-line error."""
    stacks = find_blocks(model)
    if len(stacks) != 1:
        found = ", ".join(name for name, _ in stacks) or "none"
        raise LowrankError(
            f"block-by-block compression needs exactly one stack of repeated blocks, this model has {len(stacks)} ({found}); "
            "compress it without --blockwise"
        )
    return stacks[0]


def _block_names(names: Sequence[str], prefix: str) -> list[str]:
    return [name[len(prefix) + 1 :] for name in names if name.startswith(prefix + ".")]


def block_statistics(
    block: nn.Module, names: Sequence[str], inputs: BlockInputs, index: int, hidden: list[torch.Tensor], keep_outputs: bool, per_batch: bool = False
):
    """Statistics of ``names`` (relative to ``block``) over all batches, and the block's outputs if asked.

    ``per_batch``: a list of statistics, one per batch, to be summed by the block's owner in batch
    order (:mod:`lowrank.blockwise.distributed`); otherwise their sum.
    """
    outputs = []

    def step(batch: int) -> None:
        output = run_block(block, hidden[batch], inputs.calls[index][batch])
        if keep_outputs:
            outputs.append(output)

    with torch.no_grad():
        pieces = collect_pieces(block, list(names), len(hidden), step, per_batch=per_batch)
    return (pieces if per_batch else pieces[0]), outputs


@torch.no_grad()
def collect_blockwise_statistics(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], names: Sequence[str] | None = None
) -> dict[str, LayerStatistics]:
    """Calibration statistics gathered one block at a time from recorded block inputs (dense model).

    Gives the statistics :func:`lowrank.collect_statistics` gives for the whole model at once (to
    rounding); this is the path :func:`compress_blockwise` takes.
    """
    model.eval()
    device = next(model.parameters()).device
    names = list(names) if names is not None else find_targets(model)
    stack_name, stack = single_stack(model)
    inputs = capture_block_inputs(model, stack, batches, device=device)
    hidden, statistics = inputs.hidden, {}
    for index, block in enumerate(stack):
        prefix = f"{stack_name}.{index}"
        stats, hidden = block_statistics(block, _block_names(names, prefix), inputs, index, hidden, keep_outputs=True)
        statistics.update({f"{prefix}.{name}": value for name, value in stats.items()})
    return statistics


def _sub_plan(plan: Plan, names: Sequence[str], strip: int = 0) -> Plan:
    """The part of ``plan`` for ``names``, each name shortened by ``strip`` characters (a block prefix)."""
    return Plan(
        ratio=plan.ratio,
        strategy=plan.strategy,
        shapes={name[strip:]: plan.shapes[name] for name in names},
        ranks={name[strip:]: plan.ranks[name] for name in names if name in plan.ranks},
    )


def _to_float32(stats: dict[str, LayerStatistics]) -> None:
    """Store every XᵀX in float32: the factorization converts to float32 first anyway, so the result
    is the same, and the largest matrices held while a block is factored take half the memory."""
    for inputs in {id(layer.inputs): layer.inputs for layer in stats.values()}.values():
        inputs.xtx = inputs.xtx.to(torch.float32)


def _input_groups(plan: Plan, stats: dict[str, LayerStatistics] | None) -> list[list[str]]:
    """The plan's layers grouped by the input statistics they share (q/k/v, gate/up, ...), in order."""
    groups: dict[int, list[str]] = {}
    for name in plan.shapes:
        key = id(stats[name].inputs) if stats is not None else id(name)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def _release_outside(model: nn.Module, stack: nn.ModuleList) -> None:
    """Send every parameter outside ``stack`` to ``meta`` (the stack's blocks are released one by one)."""
    inside = {id(module) for module in stack.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for key, parameter in module._parameters.items():
            if parameter is not None and parameter.device.type != "meta":
                module._parameters[key] = nn.Parameter(parameter.to("meta"), requires_grad=False)


def _release_input_embeddings(model: nn.Module) -> None:
    """Free the input embeddings once the block inputs are recorded (unless the head shares them):
    the rest of the run never reads them, and for a 32000-word vocabulary they are 262 MB."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embeddings is None or (head is not None and getattr(head, "weight", None) is getattr(embeddings, "weight", None)):
        return
    for key, parameter in embeddings._parameters.items():
        if parameter is not None and parameter.device.type != "meta":
            embeddings._parameters[key] = nn.Parameter(parameter.to("meta"), requires_grad=False)


def _fingerprint(model_dir: Path, method: str, config: Any, ratio: float, names: list[str], propagate: str, dtype, batches) -> dict:
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(batch["input_ids"].cpu().numpy().tobytes())
    return {
        "format_version": FORMAT_VERSION,
        "model": str(model_dir.resolve()),
        "method": method,
        "method_config": config_to_dict(config),
        "ratio": ratio,
        "targets": hashlib.sha256("\n".join(names).encode()).hexdigest(),
        "propagate": propagate,
        "dtype": str(dtype),
        "calibration": digest.hexdigest(),
    }


def _write_json(path: Path, data: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)


def _read_progress(work: Path, fresh: dict, num_blocks: int) -> dict:
    """The progress record of an unfinished run, checked before anything trusts it."""
    file = work / PROGRESS
    if not file.is_file():
        return fresh
    try:
        state = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        state = None
    fields = {"fingerprint": dict, "done": int, "modules": dict, "parameters": dict}
    if (
        not isinstance(state, dict)
        or not all(isinstance(state.get(key), kind) for key, kind in fields.items())
        or not 0 <= state["done"] <= num_blocks
    ):
        raise LowrankError(f"the progress record {file} of the unfinished run is damaged; pass --overwrite to start over")
    missing = [index for index in range(state["done"]) if not (work / f"block-{index:05d}.safetensors").is_file()]
    if missing:
        raise LowrankError(f"the unfinished run in {work} lacks files it recorded as written; pass --overwrite to start over")
    return state


@contextlib.contextmanager
def _notice_on_failure(work: Path, resumable: bool = True):
    """Say where an interrupted or failed run left its work, and how to continue or discard it."""
    if resumable:
        notice = f"the unfinished run is kept in {work}; rerun with --resume to continue it, or with --overwrite to discard it"
    else:
        notice = f"the unfinished run is kept in {work}; rerun with --overwrite to discard it"
    try:
        yield
    except LowrankError as error:
        raise LowrankError(f"{error} ({notice})") from None
    except BaseException:
        log.warning(notice)
        raise


BLOCKWISE_STRATEGIES = ("uniform", "global")
FISHER = "fisher.safetensors"


def _statistics_file(work: Path, index: int) -> Path:
    """Where the first pass leaves block ``index``'s statistics for the factoring pass."""
    return work / f"statistics-{index:05d}.safetensors"


def _keep_statistics(work: Path, index: int, stats: dict[str, LayerStatistics]) -> None:
    partial = _statistics_file(work, index).with_suffix(".partial")
    save_statistics(stats, partial)
    os.replace(partial, _statistics_file(work, index))  # whole or absent, for a resumed run


def _room_for_statistics(work: Path, plan: Plan, num_blocks: int) -> bool:
    """Whether the disk holding ``work`` has room for every block's statistics at once.

    An upper bound: one float32 in×in matrix per layer (layers sharing an input store it once),
    with a quarter spare for the output shards written meanwhile. Without room, the factoring pass
    runs every block again instead (the statistics equal, only slower).
    """
    need = sum(4 * inp * inp for _, inp in plan.shapes.values())
    return 1.25 * need < shutil.disk_usage(work).free if num_blocks else False


def _gradient_pass(
    model, stack_name, stack, inputs, batches, plan: Plan, method, reader, device, work: Path, progress: bool, strategy: str, exchange, keep: bool
):
    """The first pass of a gradient run: loss curves and output Fisher per layer, then the plan
    (``global``: the knapsack over the curves, as :func:`lowrank.allocate` solves it in memory).
    With ``keep``, each block's statistics are left in ``work`` for the factoring pass."""
    from .gradients import blockwise_loss_curves

    def load(index: int) -> None:
        materialize(stack[index], f"{stack_name}.{index}", reader, device)

    def free(index: int) -> None:
        release(stack[index])

    bar = tqdm(total=len(stack), desc="gradients (block by block)", disable=not progress or exchange.group.rank > 0, unit="block")
    curves, fisher = blockwise_loss_curves(
        model, stack_name, stack, inputs, batches, list(plan.shapes), method, load, free, work, device, progress=lambda _: bar.update(), exchange=exchange,
        keep=(lambda index, stats: _keep_statistics(work, index, stats)) if keep else None,
        after_loss=lambda: _release_outside(model, stack),
    )  # fmt: skip
    bar.close()
    if strategy == "global":
        plan = global_plan(curves, plan.shapes, plan.ratio)
    return plan, fisher


def _read_fisher(path: Path) -> dict[str, tuple[torch.Tensor, int]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        tokens = handle.metadata() or {}
    tensors = load_file(str(path))
    return {name: (tensors[f"{name}.output_grad_sq"], int(count)) for name, count in tokens.items()}


def _prepare_work(work: Path, fresh: dict, num_blocks: int, resume: bool, overwrite: bool, group: Group) -> dict:
    """The run's state (fresh, or an unfinished run's with ``resume``), its work directory ready."""
    fingerprint = fresh["fingerprint"]
    if work.exists() and resume:
        if group.world > 1:
            raise LowrankError(
                f"{work} holds an unfinished run, which several processes cannot resume; resume it in one process (without torchrun), or pass --overwrite to start over"
            )
        state = _read_progress(work, fresh, num_blocks)
        if state["fingerprint"] != fingerprint:
            changed = next(key for key in fingerprint if state["fingerprint"].get(key) != fingerprint[key])
            raise LowrankError(
                f"the partial run in {work} was made with a different {changed}; rerun with its arguments, or pass --overwrite to start over"
            )
        log.info("resuming %s after block %d of %d", work, state["done"], num_blocks)
        return state
    if work.exists() and not overwrite:
        raise LowrankError(f"a previous run left {work} unfinished; pass --resume to continue it or --overwrite to start over")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return fresh


def _on_process_zero(group: Group, action: Callable[[], Any]) -> Any:
    """``action()`` run by process 0 only, its result (or its failure) handed to every process, so
    that a failure there ends the others at once instead of leaving them waiting."""
    result, error = None, None
    if group.rank == 0:
        try:
            result = action()
        except Exception as failure:  # noqa: BLE001  (handed to the other processes, then raised)
            error = failure
    shared = group.broadcast((result, None if error is None else str(error)))
    if error is not None:
        raise error
    if shared[1] is not None:
        raise LowrankError(shared[1])
    return shared[0]


def compress_blockwise(
    model_dir: str | Path,
    out: str | Path,
    ratio: float,
    method: str = "whiten",
    config: Any = None,
    batches: Sequence[dict[str, torch.Tensor]] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    propagate: str = "dense",
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    tokenizer=None,
    resume: bool = False,
    overwrite: bool = False,
    max_blocks: int | None = None,
    progress: bool = True,
    on_block: Callable[[int, float], None] | None = None,
    strategy: str = "uniform",
    on_phase: Callable[[str, float], None] | None = None,
) -> CompressionReport | None:
    """Compress the checkpoint in ``model_dir`` to ``out`` one block at a time.

    The model is never whole in memory: its skeleton lives on the ``meta`` device, the weights
    outside the block stack (embeddings, final norm, head) are read once, and each block is read
    from the safetensors shards, calibrated, factored, written to its own output shard and freed.
    Work happens in ``.<out>.partial`` beside ``out``, renamed to ``out`` at the end.

    Under ``torchrun`` (``WORLD_SIZE`` > 1), or when a ``torch.distributed`` process group is
    initialized, the processes share the work (:mod:`lowrank.blockwise.distributed`): each runs its
    share of the calibration batches through every block, and each block is factored and written by
    one process; the output is byte-identical to one process's with the same number of torch threads
    per process. Such a run keeps no progress record (``resume`` and ``max_blocks`` are for one
    process) and needs ``propagate="dense"``; ``out`` must be on a file system every process sees.

    Args:
        model_dir: a Hugging Face model directory with safetensors weights.
        out: the output directory (loads with :func:`lowrank.load`).
        ratio: fraction of the targeted weights to remove, the same for every layer.
        method: a registered method (not a ``sequential`` one); one that needs gradients
            (``fisher-whiten``) gets them from the first pass described under ``strategy``.
        config: the method's config; default its defaults.
        batches: calibration batches (``{"input_ids": ...}``), required by data-aware methods.
        include / exclude: layer selection, as for :func:`lowrank.find_targets`.
        propagate: ``"dense"`` (each block calibrates on the dense model's outputs, exactly the
            statistics of all-at-once calibration) or ``"compressed"`` (on the outputs of the
            compressed blocks before it; on the reference model it fit the calibration text better
            but held-out perplexity slightly worse: 16.35 vs 16.18 at ratio 0.6).
        device: where blocks are calibrated and factored (``"cuda"`` for a GPU; under torchrun
            ``cuda:LOCAL_RANK``).
        dtype: dtype of the saved weights (default: the checkpoint's).
        tokenizer: saved beside the model when given.
        resume: continue the partial run left in ``.<out>.partial`` by an interrupted call with
            the same arguments.
        overwrite: replace an existing ``out`` (and discard a partial run).
        max_blocks: stop after this many blocks, leaving a partial run to resume (for jobs under
            a time limit); ``None`` runs to the end.
        progress: show a progress bar.
        on_block: called as ``on_block(index, seconds)`` after each block is written (by the
            process that wrote it).
        strategy: ``"uniform"`` (the same ratio everywhere) or ``"global"``: a first pass over
            the blocks back-propagates the loss one block at a time
            (:func:`lowrank.blockwise.gradients.blockwise_loss_curves`), the knapsack allocates
            once, and the factoring pass follows (``propagate="dense"`` only). Gradient methods
            and ``global`` need calibration batches with ``labels``.
        on_phase: called as ``on_phase(name, seconds)`` after each phase of the run, once the
            processes have all started: ``"record"`` (the block inputs and the rest of the model), ``"gradients"`` (the first pass, if
            any), ``"blocks"`` (statistics, factorization and shards, block by block) and
            ``"finish"`` (index, config, rename).

    Returns:
        The report (also written as ``lowrank_config.json``), or ``None`` when ``max_blocks``
        stopped the run early.

    Example:
        >>> report = compress_blockwise("model-dir", "model-0.3", 0.3, method="whiten", batches=batches)  # doctest: +SKIP
        >>> # the same on 2 processes: torchrun --nproc-per-node 2 script.py (byte-identical output)
    """
    model_dir, out = Path(model_dir), Path(out)
    spec = get_method(method)
    config = config if config is not None else spec.config_class()
    if spec.sequential or getattr(spec, "compress", None) is not None:
        raise LowrankError(f"method {method!r} needs the whole model at once; compress it without --blockwise")
    if strategy not in BLOCKWISE_STRATEGIES:
        raise LowrankError(f"--blockwise allocates with {' or '.join(BLOCKWISE_STRATEGIES)}, not {strategy!r}")
    if getattr(config, "choices", ()):
        option = "sparse_choices" if hasattr(config, "sparse_choices") else "bit_choices"
        raise LowrankError(f"method {method!r} with {option} plans every layer at once; compress it without --blockwise, or drop {option}")
    gradients = spec.needs_gradients or strategy_needs_gradients(strategy)
    if gradients and propagate != "dense":
        raise LowrankError("gradients block by block are those of the dense model; use --propagate dense with --allocate global or a gradient method")
    if gradients and not batches:
        raise LowrankError(f"method {method!r} with --allocate {strategy} needs calibration data; pass --calib FILE (a UTF-8 text file)")
    if propagate not in PROPAGATE:
        raise LowrankError(f"--propagate must be one of {', '.join(PROPAGATE)}, got {propagate!r}")
    if spec.needs_statistics and not batches:
        raise LowrankError(f"method {method!r} needs calibration data; pass --calib FILE (a UTF-8 text file)")
    check_output(out, [model_dir], overwrite)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise LowrankError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    batches = list(batches or [])

    with joined(device) as group:
        if group.world > 1:
            # Checked by every process alike, before any of them starts work.
            if propagate == "compressed":
                raise LowrankError(
                    "--propagate compressed calibrates each block on the compressed one before it, one block after another; run it in one process (without torchrun)"
                )
            if max_blocks is not None:
                raise LowrankError("max_blocks leaves a partial run to resume, which only one process can; run it without torchrun")
            if batches and len(batches) < group.world:
                raise LowrankError(
                    f"{len(batches)} calibration batches cannot be shared by {group.world} processes; pass more --num-samples or run fewer processes"
                )
        device = group.device
        clock = time.perf_counter()

        def phase(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            if on_phase is not None:
                on_phase(name, now - clock)
            clock = now

        reader = CheckpointReader(model_dir)
        return_freed_memory()
        model = empty_model(model_dir)
        stack_name, stack = single_stack(model)
        plan = allocate(model, ratio, method=method, strategy="uniform", include=include, exclude=exclude)
        names = list(plan.shapes)
        fingerprint = _fingerprint(model_dir, method, config, ratio, names, propagate, dtype, batches)
        fingerprint["strategy"] = strategy

        work = Path(group.broadcast(str(out.absolute().parent / f".{out.name}.partial")))  # one path, whatever each process's view
        fresh = {"fingerprint": fingerprint, "done": 0, "modules": {}, "parameters": {}, "ranks": None}
        state = _on_process_zero(group, lambda: _prepare_work(work, fresh, len(stack), resume, overwrite, group))
        clock = time.perf_counter()  # phases from here: every process has arrived (start-up skew is not a phase's)
        single = group.world == 1  # only then is progress recorded, and a run resumable

        with _notice_on_failure(work, resumable=single):
            skip = tied_keys(model)
            model.tie_weights()
            model_before = sum(parameter.numel() for parameter in model.parameters())  # tied weights once
            outside = [key for key, _ in model.named_parameters() if not key.startswith(stack_name + ".") and key not in skip]

            exchange = StatisticsExchange(group, len(batches))
            local = [batches[index] for index in group.batches(len(batches))]  # this process's share (all of them for one)
            inputs, hidden = BlockInputs(calls=[[] for _ in stack]), []
            if batches:
                # Embeddings (and whatever else runs before the stack) are needed once, to record block inputs.
                model.load_state_dict(reader.read(outside, device=device), strict=False, assign=True)
                model.tie_weights()
                for module in model.modules():
                    for key, buffer in module._buffers.items():
                        if buffer is not None and buffer.device.type != "meta":
                            module._buffers[key] = buffer.to(device)
                materialize(stack[0], f"{stack_name}.0", reader, device)
                inputs = capture_block_inputs(model, stack, local, device=device)
                hidden = inputs.hidden
                if state["done"] > 0 and not state.get("statistics"):
                    try:
                        saved = load_file(str(work / HIDDEN), device=str(device))
                        hidden = [saved[f"batch.{batch}"] for batch in range(len(batches))]
                    except (OSError, KeyError, SafetensorError):
                        raise LowrankError(f"the unfinished run in {work} has unreadable block outputs; pass --overwrite to start over") from None
                    release(stack[0])
            # Everything outside the stack (embeddings, final norm, head) goes to its own shard now
            # (the first pass reads the head and final norm, but never writes them).
            if group.rank == 0 and not (work / REST).is_file():
                outside_keys = set(outside)
                rest = reader.read(outside) if not batches else {key: value for key, value in model.state_dict().items() if key in outside_keys}
                if dtype is not None:
                    rest = {key: value.to(dtype) if value.is_floating_point() else value for key, value in rest.items()}
                write_shard(rest, work / REST)
                del rest
            phase("record")
            _release_input_embeddings(model)

            fisher: dict[str, tuple[torch.Tensor, int]] = {}
            if gradients and state.get("ranks") is None:
                # The first pass sums every block's statistics on its way back; with dense propagation
                # they are the ones the factoring pass needs, so (disk permitting) it reads them
                # instead of running every block forward again.
                state["statistics"] = _on_process_zero(group, lambda: _room_for_statistics(work, plan, len(stack)))
                plan, fisher = _gradient_pass(
                    model, stack_name, stack, inputs, local, plan, method, reader, device, work, progress, strategy, exchange,
                    keep=state["statistics"],
                )  # fmt: skip
                if single:
                    save_file({f"{name}.output_grad_sq": value for name, (value, _) in fisher.items()}, str(work / FISHER),
                              metadata={name: str(tokens) for name, (_, tokens) in fisher.items()})  # fmt: skip
                    state["ranks"] = plan.ranks
                    state["predicted_error"] = plan.predicted_error
                    _write_json(work / PROGRESS, state)  # a resumed run reuses the allocation and the Fisher sums
                phase("gradients")
            elif gradients:
                plan = Plan(ratio=ratio, strategy=strategy, shapes=plan.shapes, ranks=state["ranks"], predicted_error=state.get("predicted_error"))
                fisher = _read_fisher(work / FISHER)
            # Nothing after the recording (and the first pass) reads the weights outside the stack again.
            _release_outside(model, stack)

            written: dict[int, tuple[dict, dict]] = {}  # block → (its modules, its parameter counts), for the blocks this process wrote

            kept = bool(state.get("statistics"))  # the first pass left every block's statistics in `work`
            if kept:
                hidden = []

            def factor(index: int, block: nn.Module, block_plan: Plan, receipt, started: float) -> list[torch.Tensor]:
                """The owner's part of block ``index``: sum its statistics (or read the first pass's),
                factor it, write its shard. Returns its outputs when they are to be computed from the
                compressed block."""
                prefix = f"{stack_name}.{index}"
                if kept:
                    stats = load_statistics(_statistics_file(work, index), device=device)
                else:
                    stats = exchange.fold(receipt) if receipt is not None else None
                for name, layer_stats in (stats or {}).items():
                    if f"{prefix}.{name}" in fisher:
                        layer_stats.output_grad_sq, layer_stats.num_grad_tokens = fisher[f"{prefix}.{name}"]
                if stats and getattr(config, "precision", "float64") == "float32":
                    _to_float32(stats)
                modules: dict[str, Any] = {}
                block_counts: dict[str, int] = {}
                for group_names in _input_groups(block_plan, stats):
                    # One group of layers reading the same input at a time; its statistics (and cached
                    # whitening) are dropped before the next: only one input's n×n matrices are alive.
                    group_plan = _sub_plan(block_plan, group_names)
                    group_stats = {name: stats.pop(name) for name in group_names} if stats is not None else None
                    report = compress_layers_(block, group_plan, method=method, stats=group_stats, config=config, sequential=None, progress=False)
                    del group_stats
                    modules.update({f"{prefix}.{name}": value for name, value in report.modules.items()})
                    for key, value in report.parameters.items():
                        if key.startswith("targeted"):
                            block_counts[key] = block_counts.get(key, 0) + value
                outputs = []
                if batches and propagate == "compressed":
                    with torch.no_grad():
                        outputs = [run_block(block, state_, inputs.calls[index][batch]) for batch, state_ in enumerate(hidden)]
                if dtype is not None:
                    # After every group is factored (each from the checkpoint's values), the block is cast
                    # and its bits counted as written; quantization scales keep their stored dtype.
                    cast_(block, dtype, block_counts, block_plan.shapes)
                write_shard({f"{prefix}.{key}": value for key, value in block.state_dict().items()}, work / f"block-{index:05d}.safetensors")
                release(block)
                written[index] = (modules, block_counts)
                if on_block is not None:
                    on_block(index, time.perf_counter() - started)
                return outputs

            waiting: list[tuple] = []  # blocks this process owns, read and run, not yet factored
            stop = len(stack) if max_blocks is None else min(len(stack), state["done"] + max_blocks)
            bar = tqdm(range(state["done"], stop), desc=f"compress ({method}, block by block)", disable=not progress or group.rank > 0, unit="block")
            for index in bar:
                if kept and not group.owns(index):
                    continue  # nothing to run: its owner reads its statistics
                started = time.perf_counter()
                prefix = f"{stack_name}.{index}"
                block = stack[index]
                materialize(block, prefix, reader, device)
                block_plan = _sub_plan(plan, [name for name in names if name.startswith(prefix + ".")], strip=len(prefix) + 1)
                pieces, outputs = [], []
                if batches and not kept:
                    pieces, outputs = block_statistics(
                        block, list(block_plan.shapes), inputs, index, hidden, keep_outputs=propagate == "dense", per_batch=exchange.per_batch
                    )
                    pieces = pieces if exchange.per_batch else [pieces]
                if group.owns(index):
                    waiting.append((index, block, block_plan, exchange.receive(index, pieces) if batches and not kept else None, started))
                else:
                    if batches and not kept:
                        exchange.send(index, pieces)
                    release(block)
                del pieces
                while len(waiting) > exchange.lag:
                    compressed = factor(*waiting.pop(0))
                    if propagate == "compressed":  # one process: the block just factored is this one
                        outputs = compressed
                if single:
                    for block_index in sorted(written):
                        modules, block_counts = written.pop(block_index)
                        state["modules"].update(modules)
                        for key, value in block_counts.items():
                            state["parameters"][key] = state["parameters"].get(key, 0) + value
                hidden = outputs
                if single:
                    if batches and not kept:
                        save_file(
                            {f"batch.{batch}": value.detach().contiguous().cpu() for batch, value in enumerate(hidden)},
                            str(work / (HIDDEN + ".partial")),
                        )
                        os.replace(work / (HIDDEN + ".partial"), work / HIDDEN)
                    state["done"] = index + 1
                    _write_json(work / PROGRESS, state)  # the commit point: block `index` is done
                    _statistics_file(work, index).unlink(missing_ok=True)
                del outputs
            for job in waiting:
                factor(*job)
            exchange.close()

            if state["done"] < len(stack) and single:
                log.info("stopped after block %d of %d; continue with --resume", state["done"], len(stack))
                return None
            if not single:
                for owned in group.all_gather(written):  # also the point where every shard is written
                    written.update(owned)
                for block_index in sorted(written):
                    modules, block_counts = written[block_index]
                    state["modules"].update(modules)
                    for key, value in block_counts.items():
                        state["parameters"][key] = state["parameters"].get(key, 0) + value
            phase("blocks")

            counts = state["parameters"] or {"targeted_before": 0, "targeted_after": 0, "targeted_bits_before": 0, "targeted_bits_after": 0}
            counts["model_before"] = model_before
            counts["model_after"] = model_before - counts["targeted_before"] + counts["targeted_after"]
            plan.details["blockwise"] = {"propagate": propagate, "calibration_batches": len(batches)}
            report = CompressionReport(method=method, method_config=config_to_dict(config), plan=plan, modules=state["modules"], parameters=counts)

            def finish() -> None:
                # The rest of the model, the index, config and report; then the partial directory becomes `out`.
                write_index(work, [f"block-{index:05d}.safetensors" for index in range(len(stack))] + [REST])
                if dtype is not None:
                    model.config.dtype = dtype
                model.config.save_pretrained(work)
                if (model_dir / "generation_config.json").is_file():
                    shutil.copy(model_dir / "generation_config.json", work / "generation_config.json")
                if tokenizer is not None:
                    tokenizer.save_pretrained(work)
                (work / LOWRANK_CONFIG).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
                write_remote_code(work, report.to_dict())  # loads with transformers alone, as lowrank.save's output does
                for file in (PROGRESS, HIDDEN, FISHER, *(_statistics_file(work, index).name for index in range(len(stack)))):
                    (work / file).unlink(missing_ok=True)
                replace_directory(work, out.absolute())

            _on_process_zero(group, finish)
        phase("finish")
        return report
