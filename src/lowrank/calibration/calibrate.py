"""The calibration stage: text in, per-layer statistics out."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LowrankError
from ..nn import expert_projection_names, find_targets, linear_shape
from .data import sample_windows, tokenize_stream
from .formats import DEFAULT_SAMPLES
from .statistics import LayerStatistics, StatisticsCollector

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _gradients_only_for(model: nn.Module, layers: Sequence[nn.Module], weights: bool):
    """Let back-propagation reach the outputs of ``layers`` and no parameter it does not need.

    With ``weights`` the layers' weights require gradients (Fisher-weighted SVD reads them).
    Without, no parameter does: the input embeddings' output is made to require gradients instead,
    so the backward pass computes only activation gradients. Linear layers then save no inputs for
    it and no weight gradient is formed, which on SmolLM2-135M halves the resident memory of
    calibration. A model without input embeddings falls back to the layers' weights. Flags are
    restored on exit.
    """
    previous = {parameter: parameter.requires_grad for parameter in model.parameters()}
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = None if weights or not callable(get_embeddings) else get_embeddings()
    handle = None
    try:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        if isinstance(embeddings, nn.Module):
            # A detached leaf that requires gradients: everything downstream gets a grad_fn.
            handle = embeddings.register_forward_hook(lambda _m, _i, output: output.detach().requires_grad_())
        else:
            for layer in layers:
                layer.weight.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        if handle is not None:
            handle.remove()
        for parameter, flag in previous.items():
            parameter.requires_grad_(flag)
            parameter.grad = None


def split_batch(batch: dict[str, torch.Tensor], size: int | None) -> list[dict[str, torch.Tensor]]:
    """``batch`` cut along its first dimension into pieces of at most ``size`` rows (``None``: whole).

    Example:
        >>> [piece["input_ids"].shape[0] for piece in split_batch({"input_ids": torch.zeros(5, 3)}, 2)]
        [2, 2, 1]
    """
    rows = next(iter(batch.values())).shape[0]
    if size is None or size >= rows:
        return [batch]
    return [{key: value[start : start + size] for key, value in batch.items()} for start in range(0, rows, size)]


# Windows per forward and backward pass when collecting gradients: the statistics are sums, so this
# changes only memory. For SmolLM2-135M (256-token windows, 49,152-word vocabulary) each window's
# logits, their log-softmax and its gradient alone take 150 MB; see benchmarks/cost.py.
GRADIENT_MICRO_BATCH = 2


class _ReachedHead(Exception):
    """Raised when a forward pass without gradients reaches the output head: nothing after it is calibrated."""


def output_head(model: nn.Module, names: Sequence[str]) -> nn.Module | None:
    """The model's output head (``lm_head``) unless it is one of the layers ``names``, else ``None``.

    Without gradients, calibration stops each forward pass when it reaches this module: its
    full-vocabulary logits (8 × 256 × 49,152 floats, 0.4 GB, for SmolLM2) and the loss would be
    computed only to be thrown away.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Module) or any(model.get_submodule(name) is head for name in names):
        return None
    return head


@contextlib.contextmanager
def _stop_at(head: nn.Module | None, collector: StatisticsCollector):
    """Make ``head`` end the forward pass (raise :class:`_ReachedHead`) once a target has run in it."""
    if head is None:
        yield
        return
    calls_before_pass = collector.calls

    def stop(_module, _inputs):
        # A head reached before any target (an unusual model) lets the pass run on.
        if collector.calls > calls_before_pass:
            raise _ReachedHead

    handle = head.register_forward_pre_hook(stop)
    try:
        yield
    finally:
        handle.remove()


def collect_statistics(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    names: Sequence[str],
    gradients: bool = False,
    progress: bool = True,
    total: int | None = None,
    weight_gradients: bool | None = None,
    micro_batch: int | None = GRADIENT_MICRO_BATCH,
    output_gram: Sequence[str] = (),
) -> dict[str, LayerStatistics]:
    """Run ``model(**batch)`` for every batch and return the statistics of layers ``names``.

    The low-level entry point: use it for inputs that are not plain token windows (an encoder's
    sentences with attention masks, say).

    Args:
        model: any module taking the batches as keyword arguments.
        batches: dicts of tensors; with ``gradients`` they must make the model return a ``loss``
            (e.g. include ``labels``).
        names: linear layers to collect for.
        gradients: also back-propagate the summed token loss and collect squared output gradients
            (the diagonal empirical Fisher of each layer's outputs); costs one backward pass per
            batch. Without it, each forward pass stops at the output head (:func:`output_head`)
            unless that is a target.
        progress: show a progress bar.
        total: number of batches, for the progress bar.
        weight_gradients: with ``gradients``, also sum each batch's squared weight gradients
            (``fwsvd`` reads them); default: as ``gradients``. Without them the backward pass
            forms no weight gradient at all, which is cheaper in time and memory.
        micro_batch: with ``gradients``, rows of a batch per forward and backward pass (``None``:
            the whole batch). Weight gradients are still summed over the whole batch before
            squaring, so this changes memory, not the statistics (up to float rounding).
        output_gram: with ``gradients``, layers whose full output Fisher Σ (∂L/∂y)(∂L/∂y)ᵀ is
            summed too (``LayerStatistics.output_fisher_matrix``; out² numbers per layer): what
            ``Method.output_gram`` names for a method and its options.
    """
    model.eval()
    device = next(model.parameters()).device
    layers = [model.get_submodule(name) for name in names]
    weight_gradients = gradients if weight_gradients is None else weight_gradients and gradients
    grad_context = _gradients_only_for(model, layers, weight_gradients) if gradients else torch.no_grad()
    head = None if gradients else output_head(model, names)
    with grad_context, StatisticsCollector(model, names, gradients=gradients, output_gram=output_gram) as collector:
        for batch in tqdm(batches, desc="calibrate", total=total, disable=not progress, unit="batch"):
            batch = {key: value.to(device) for key, value in batch.items()}
            if not gradients:
                try:
                    with _stop_at(head, collector):
                        model(**batch)
                except _ReachedHead:
                    pass
                continue
            for piece in split_batch(batch, micro_batch):
                output = model(**piece)
                if getattr(output, "loss", None) is None:
                    raise LowrankError(
                        f"{type(model).__name__} returned no loss, so there are no gradients to collect; "
                        "calibrate without gradients (a method/allocation that needs no backward pass) or use a model with a language-model head"
                    )
                # HF losses are token means; the sum makes each token's gradient independent of batch size.
                predicted = (piece["labels"][:, 1:] != -100).sum()
                (output.loss * predicted).backward()
                del output
            if weight_gradients:
                collector.accumulate_weight_gradients()
    experts = set(expert_projection_names(model))
    unrouted = [name for name in names if name not in collector.statistics and name in experts]
    if unrouted:
        # Experts the router never picked get zero sums rather than an error: whitening then falls
        # back to plain SVD (identity), and loss-aware allocation sees no loss from them.
        log.warning("%d expert layers received no calibration token (e.g. %s); their statistics are zero", len(unrouted), unrouted[0])
    for name in unrouted:
        out_features, in_features = linear_shape(model.get_submodule(name))
        stats = collector.statistics[name] = LayerStatistics.zeros(in_features, device=device)
        if gradients:
            stats.output_grad_sq = torch.zeros(out_features, dtype=torch.float64, device=device)
            if name in output_gram:
                stats.output_grad_gram = torch.zeros(out_features, out_features, dtype=torch.float64, device=device)
        if weight_gradients:
            stats.weight_grad_sq = torch.zeros(out_features, dtype=torch.float64, device=device)
    missing = [name for name in names if name not in collector.statistics]
    assert not missing, f"calibration never reached layers {missing[:3]}"
    return collector.statistics


def calibrate(
    model: nn.Module,
    tokenizer,
    texts: str | Sequence[str],
    num_samples: int = DEFAULT_SAMPLES["window"],
    seq_len: int = 256,
    seed: int = 0,
    targets: Sequence[str] | None = None,
    batch_size: int = 8,
    gradients: bool = False,
    progress: bool = True,
    weight_gradients: bool | None = None,
    output_gram: Sequence[str] = (),
) -> dict[str, LayerStatistics]:
    """Accumulate XᵀX of every targeted linear layer over ``num_samples`` windows of ``seq_len`` tokens.

    Windows start at seeded random offsets in the concatenated token stream of ``texts``, so the
    same seed gives the same statistics.

    Args:
        model: a Hugging Face (or any) model taking ``input_ids``.
        tokenizer: the model's tokenizer.
        texts: one text or a list of texts (documents are concatenated).
        num_samples: number of windows.
        seq_len: tokens per window.
        seed: seed of the window sampling.
        targets: layer names; default :func:`lowrank.nn.find_targets` (linears inside the blocks).
        batch_size: windows per forward pass.
        gradients: also collect Fisher information from the language-model loss (a backward pass
            per batch); needed by ``fwsvd``, ``fisher-whiten`` and loss-aware allocation.
        progress: show a progress bar.
        weight_gradients: with ``gradients``, also squared weight gradients (only ``fwsvd`` reads
            them); default: as ``gradients``.
        output_gram: with ``gradients``, layers whose full output Fisher is collected too (see
            :func:`collect_statistics`).

    Returns:
        ``{layer name: LayerStatistics}``.

    Example:
        >>> stats = calibrate(model, tokenizer, open("calib.txt").read(), num_samples=64)  # doctest: +SKIP
    """
    names = list(targets) if targets is not None else find_targets(model)
    batches = calibration_batches(tokenizer, texts, num_samples, seq_len, seed, batch_size)
    return collect_statistics(model, batches, names, gradients, progress, len(batches), weight_gradients, output_gram=output_gram)


def calibration_batches(
    tokenizer, texts: str | Sequence[str], num_samples: int = DEFAULT_SAMPLES["window"], seq_len: int = 256, seed: int = 0, batch_size: int = 8
) -> list[dict[str, torch.Tensor]]:
    """The batches :func:`calibrate` runs: ``{"input_ids", "labels"}`` of seeded random windows.

    Pass them to ``compress_(..., sequential=batches)`` to refit on exactly the calibration tokens.
    """
    windows = sample_windows(tokenize_stream(tokenizer, texts), num_samples, seq_len, seed)
    return [
        {"input_ids": windows[start : start + batch_size], "labels": windows[start : start + batch_size]}
        for start in range(0, len(windows), batch_size)
    ]
