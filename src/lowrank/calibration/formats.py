"""What calibration text looks like to the model: plain or chat-formatted windows, or padded lines.

Calibration statistics are only as good as the match between the calibration inputs and what the
model sees in use. Two mismatches are common enough to have options:

* **Instruction models** (``--calib-format chat``) see text inside their chat template (role
  markers, a system prompt, end-of-turn tokens), never a bare stream. :func:`chat_texts` splits the
  text into chunks at paragraph boundaries (:data:`CHAT_CHUNK_CHARS` characters each) and renders
  groups of :data:`CHAT_TURNS` consecutive chunks as one conversation of alternating user and
  assistant turns. Both roles appear because a deployed model reads user turns and writes
  assistant turns; consecutive chunks keep the text in order, so the content is exactly that of
  the plain stream and only the format differs. Windows are then cut from the rendered
  conversations as for plain text (:func:`lowrank.calibration.data.sample_windows`).
* **Sentence encoders** (``--calib-unit line``) see one sentence or line at a time, padded into a
  batch, with an attention mask; a 256-token window cut from a text stream is not such an input.
  :func:`line_batches` samples ``num_samples`` non-empty lines at seeded random positions,
  truncates each to ``seq_len`` tokens and pads them into batches; :func:`collect_masked_statistics`
  collects their statistics with the padded positions left out of XᵀX, Σ|x| and the token counts.

Example:
    >>> batches = calibration_inputs(tokenizer, text, unit="line", num_samples=64, seq_len=128)  # doctest: +SKIP
    >>> stats = collect_masked_statistics(model, batches, find_targets(model))  # doctest: +SKIP
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import LowrankError
from .data import sample_windows, tokenize_stream

CALIB_FORMATS = ("plain", "chat")
CALIB_UNITS = ("window", "line")

DEFAULT_SAMPLES = {"window": 128, "line": 1024}
"""Default ``--num-samples`` per unit: 128 windows of 256 tokens, or 1,024 lines (14,747 tokens of
``pycode-calib.txt`` lines with [CLS]/[SEP] for MiniLM).

Windows: 128, not the 64 of earlier releases, from the default recipe (``modegpt`` types I + III +
``global``) on both reference models, 3 calibration seeds: SmolLM2-135M at 0.2 loses 1.142× dense
perplexity on held-out Python with 128 windows against 1.155× with 64, at 0.4 1.554× against 1.60×
(``benchmarks/results/quality-modegpt-calib128-3seeds-smollm2.md``); the reference model at 0.6
reaches 14.54 against 14.65 (``quality-modegpt-calib128.md``). More gains little: 256 and 512
windows give 14.50 and 14.49 at 0.6 (one seed, ``quality-modegpt-calib256-probe.md``,
``quality-modegpt-calib512-probe.md``). The cost is calibration time, which doubles (one forward
and one backward pass per window).

Lines: with 64 lines
(901 tokens) an encoder's 1,536-wide MLP input has fewer samples than dimensions; on
all-MiniLM-L6-v2 at ``whiten`` 0.3 the embedding cosine rises from 0.79 (64 lines) to 0.84 (256)
and 0.86 (1,024), against 0.80 for 64 windows (``benchmarks/results/calibration_unit.md``)."""

CHAT_CHUNK_CHARS = 1000
"""Characters per chat turn: about 250–300 tokens of code or prose, so a 256-token window holds
about one turn boundary (role markers at the rate a conversation has them) rather than mostly
template tokens."""

CHAT_TURNS = 4
"""Turns per conversation (user, assistant, user, assistant): the system prompt the template adds
to every conversation is then a few percent of the tokens, not a fixed part of every window."""


def default_unit(model_or_class) -> str:
    """``"window"`` for a model that generates text (a causal LM), ``"line"`` for any other (an encoder).

    Args:
        model_or_class: a model instance or a transformers model class.
    """
    can_generate = getattr(model_or_class, "can_generate", None)
    return "window" if callable(can_generate) and can_generate() else "line"


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` carries a chat template (``tokenizer.chat_template``)."""
    return bool(getattr(tokenizer, "chat_template", None))


def text_chunks(text: str, chunk_chars: int = CHAT_CHUNK_CHARS) -> list[str]:
    """Consecutive chunks of ``text`` cut at blank lines, each at least ``chunk_chars`` long (the last may be shorter).

    A paragraph longer than ``chunk_chars`` stays whole; no text is dropped except the blank lines
    between chunks.
    """
    chunks, current, size = [], [], 0
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.lstrip("\n").rstrip()  # leading indentation is content; trailing space is not
        if not paragraph:
            continue
        current.append(paragraph)
        size += len(paragraph)
        if size >= chunk_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def chat_texts(tokenizer, text: str, chunk_chars: int = CHAT_CHUNK_CHARS, turns: int = CHAT_TURNS) -> list[str]:
    """``text`` rendered as conversations with the tokenizer's chat template (see the module docstring).

    Args:
        tokenizer: a tokenizer with a chat template.
        text: calibration text.
        chunk_chars: characters per turn (:data:`CHAT_CHUNK_CHARS`).
        turns: turns per conversation, alternating user and assistant (:data:`CHAT_TURNS`).

    Returns:
        One rendered string per conversation; their tokens (without added special tokens, as
        :func:`~lowrank.calibration.data.tokenize_stream` reads them) are those of
        ``tokenizer.apply_chat_template(messages)``.

    Raises:
        LowrankError: if the tokenizer has no chat template.

    Example:
        >>> stats = lowrank.calibrate(model, tokenizer, chat_texts(tokenizer, text))  # doctest: +SKIP
    """
    if not has_chat_template(tokenizer):
        raise LowrankError(
            f"--calib-format chat needs a tokenizer with a chat template, and {type(tokenizer).__name__} has none; "
            "use --calib-format plain (the default) or a model whose tokenizer_config.json has a chat_template"
        )
    chunks = text_chunks(text, chunk_chars)
    conversations = []
    for start in range(0, len(chunks), turns):
        messages = [{"role": ("user", "assistant")[index % 2], "content": chunk} for index, chunk in enumerate(chunks[start : start + turns])]
        conversations.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return conversations


def sample_lines(text: str, num_samples: int, seed: int = 0) -> list[str]:
    """``num_samples`` distinct non-empty lines of ``text`` at seeded random positions (in text order).

    Raises:
        LowrankError: if the text has fewer non-empty lines than ``num_samples``.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) < num_samples:
        raise LowrankError(
            f"calibration text has {len(lines)} non-empty lines, fewer than --num-samples {num_samples}; pass a longer file or a smaller --num-samples"
        )
    picked = sorted(random.Random(seed).sample(range(len(lines)), num_samples))
    return [lines[index] for index in picked]


def line_batches(
    tokenizer, text: str, num_samples: int = 64, seq_len: int = 256, seed: int = 0, batch_size: int = 8, labels: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Padded batches of sampled lines: ``{"input_ids", "attention_mask"}`` (and ``"labels"``).

    Each line is tokenized as the model sees a sentence in use (with the tokenizer's special
    tokens, e.g. ``[CLS] … [SEP]``), truncated to ``seq_len`` tokens, and padded on the right;
    lines are sorted by length so that batches hold little padding.

    Args:
        tokenizer: the model's tokenizer (a missing pad token is fine: padded positions are masked).
        text: calibration text.
        num_samples: lines to sample (:func:`sample_lines`).
        seq_len: most tokens per line.
        seed: seed of the line sampling.
        batch_size: lines per batch.
        labels: add ``labels`` (the ids, -100 at padding) so a causal LM returns its loss.
    """
    encoded = [tokenizer(line, truncation=True, max_length=seq_len)["input_ids"] for line in sample_lines(text, num_samples, seed)]
    encoded.sort(key=len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(encoded), batch_size):
        group = encoded[start : start + batch_size]
        width = max(len(ids) for ids in group)
        input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, ids in enumerate(group):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if labels:
            batch["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
        batches.append(batch)
    return batches


def calibration_inputs(
    tokenizer,
    text: str,
    unit: str = "window",
    format: str = "plain",
    num_samples: int = 64,
    seq_len: int = 256,
    seed: int = 0,
    batch_size: int = 8,
    labels: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """The calibration batches of ``lowrank compress``: windows (plain or chat) or padded lines.

    Args:
        tokenizer: the model's tokenizer.
        text: calibration text.
        unit: ``"window"`` (random windows of a token stream) or ``"line"`` (:func:`line_batches`).
        format: ``"plain"`` or ``"chat"`` (:func:`chat_texts`); ``chat`` needs ``unit="window"``.
        num_samples, seq_len, seed, batch_size: as in :func:`lowrank.calibrate`.
        labels: add ``labels`` (for a causal LM's loss; -100 at padding); an encoder takes none.
    """
    if unit not in CALIB_UNITS:
        raise LowrankError(f"--calib-unit must be one of {', '.join(CALIB_UNITS)}, got {unit!r}")
    if format not in CALIB_FORMATS:
        raise LowrankError(f"--calib-format must be one of {', '.join(CALIB_FORMATS)}, got {format!r}")
    if unit == "line":
        if format != "plain":
            raise LowrankError("--calib-format chat renders conversations to cut windows from; use it with --calib-unit window")
        return line_batches(tokenizer, text, num_samples, seq_len, seed, batch_size, labels=labels)
    texts = chat_texts(tokenizer, text) if format == "chat" else text
    windows = sample_windows(tokenize_stream(tokenizer, texts), num_samples, seq_len, seed)
    batches = [{"input_ids": windows[start : start + batch_size]} for start in range(0, len(windows), batch_size)]
    for batch in batches if labels else []:
        batch["labels"] = batch["input_ids"]
    return batches


class _PaddingMask:
    """Forward pre-hooks that zero the padded positions of every hooked layer's input.

    The statistics hooks (:class:`~lowrank.calibration.statistics.StatisticsCollector`) sum every
    row they see; a zero row adds nothing to XᵀX or Σ|x|, and the counts are corrected after the
    run from the padded rows counted here. Zeroing is exact for the real tokens: a linear layer
    acts on each position alone, and attention never reads a padded position, so no real token's
    value changes.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.model, self.names = model, list(names)
        self.mask: torch.Tensor | None = None  # (B, T) of the batch being run
        self.padded_rows = dict.fromkeys(self.names, 0)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, its masked copy)
        self._handles: list = []

    def _read_mask(self, _model: nn.Module, _args: tuple, kwargs: dict) -> None:
        # Read from the model call itself, so a batch split into micro-batches masks each piece.
        self.mask = kwargs.get("attention_mask")
        self._last = None

    def _hook(self, name: str):
        def hook(_module: nn.Module, args: tuple):
            if self.mask is None:
                return None
            x = args[0]
            if x.shape[:-1] != self.mask.shape:
                raise LowrankError(
                    f"layer {name} sees inputs of shape {tuple(x.shape)}, not (batch, tokens, features), so padding cannot be left out of its statistics; "
                    "calibrate this model with --calib-unit window"
                )
            self.padded_rows[name] += int((self.mask == 0).sum())
            if self._last is not None and self._last[0] is x:
                # Layers reading one tensor (q, k, v) get one masked tensor, so the collector still sees them share it.
                return (self._last[1], *args[1:])
            masked = x * self.mask.to(device=x.device, dtype=x.dtype).unsqueeze(-1)  # (B, T, in)
            self._last = (x, masked)
            return (masked, *args[1:])

        return hook

    def __enter__(self) -> _PaddingMask:
        self._handles.append(self.model.register_forward_pre_hook(self._read_mask, with_kwargs=True))
        for name in self.names:
            self._handles.append(self.model.get_submodule(name).register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last = None


def collect_masked_statistics(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    names: Sequence[str],
    gradients: bool = False,
    progress: bool = True,
    weight_gradients: bool | None = None,
    output_gram: Sequence[str] = (),
):
    """:func:`~lowrank.calibration.calibrate.collect_statistics`, leaving out positions whose ``attention_mask`` is 0.

    Batches without an ``attention_mask`` (token windows) are run unchanged. The statistics of
    padded batches equal those of their lines run one at a time, unpadded.

    Args:
        model: the model; batches are passed as keyword arguments.
        batches: e.g. from :func:`calibration_inputs`.
        names: linear layers to collect for.
        gradients: also collect Fisher information (the model must return a loss).
        progress: show a progress bar.
        weight_gradients: also squared weight gradients (default: as ``gradients``).
        output_gram: layers whose full output Fisher is collected too (padded positions have zero gradient).

    Example:
        >>> stats = collect_masked_statistics(encoder, line_batches(tokenizer, text), find_targets(encoder))  # doctest: +SKIP
    """
    from .calibrate import collect_statistics

    if not any("attention_mask" in batch for batch in batches):
        return collect_statistics(model, batches, names, gradients, progress, len(batches), weight_gradients, output_gram=output_gram)
    with _PaddingMask(model, names) as padding:
        statistics = collect_statistics(model, batches, names, gradients, progress, len(batches), weight_gradients, output_gram=output_gram)
    corrected = set()
    for name in names:
        stats = statistics[name]
        if id(stats.inputs) not in corrected:  # shared inputs were counted once, by one of their layers
            corrected.add(id(stats.inputs))
            stats.inputs.num_tokens -= padding.padded_rows[name]
        if stats.output_grad_sq is not None:
            # Padded positions get exactly zero gradient (no loss term reads them), but were counted.
            stats.num_grad_tokens -= padding.padded_rows[name]
    return statistics
