"""Healing a compressed model: distil the dense model's next-token distributions into the factors.

A compressed model should become the dense model again, not a model fitted to the calibration
text, so the target is the dense *teacher*'s distribution at every position (Hinton et al. 2015),
not the one token that followed: it carries the teacher's uncertainty, and on held-out text the
student then moves towards the teacher rather than towards the calibration sample.

What trains: every floating-point parameter of the compressed layers (the
:class:`~lowrank.nn.ReplacementLinear` modules: the factors of a low-rank layer, the values of a
sparse part, a dictionary's atoms and code values, and their biases) and, by default, the
normalization layers' weights. Their structure is kept: ranks, sparsity patterns (index buffers)
and quantized codes (``uint8`` buffers) do not change, so a low-rank + quantized layer trains only
its float factors around the fixed quantized residual. A low-rank + quantized layer with outliers
(:class:`~lowrank.nn.lowrank_quant_linear.LowRankQuantSparseLinear`) trains its factors only: its
outliers are part of the fixed quantized base (:data:`FROZEN_PARAMETERS`). Embeddings, the output
head and layers the plan left dense stay bit for bit as they were.

Memory: the teacher runs once over the training windows before training
(:func:`build_teacher_cache`) and keeps, per position, only its top-k log-probabilities and their
vocabulary indices, in memory-mapped files of a work directory; the teacher is then freed and the
student trains from the files, so teacher and student are never in memory together and the cache
never is either (one batch at a time is read). At k = 64 a window of 128 tokens costs 64 KB.

The loss: the KL divergence KL(p ‖ q) between the teacher's (p) and student's (q) distributions,
both coarsened to k + 1 outcomes: each of the teacher's top-k tokens, and "any other token" (the
tail, mass 1 − Σ top-k). This is a true KL divergence (≥ 0, zero when the student gives the same
mass to those k tokens and to the rest); it equals the full KL at k = vocabulary size and, by the
data-processing inequality, never exceeds it. With a temperature T both distributions are
softened by T and the loss is multiplied by T², which keeps gradient sizes comparable across T.

Early stopping: with a validation cache (the teacher's distributions on windows the student never
trains on, e.g. the last part of the calibration text, :func:`split_tokens`; never the evaluation
text) and ``eval_every``, the held-out KL (with ``hard_weight``, the mixed objective,
:func:`held_out_loss`) is measured before training and every ``eval_every``
steps, and the student ends with the parameters of the best measurement. Healing then never leaves
the model further from the teacher on held-out windows than it started: a compressed model that is
already close to it (a 4-bit ``lowrank-quant`` model of the reference model starts at a KL of
~0.001) gains little and can lose to the noise of small batches. It also catches a learning rate
that is too high: a 4-bit ``lowrank-quant`` SmolLM2 reached its lowest held-out KL at step 5 of a
warm-up to 3·10⁻⁴ and lost it by step 10 (``benchmarks/results/heal-smoke-smollm2.md``), while at
10⁻⁴ the KL fell at every measurement of 40 steps (``heal-quant-smollm2.md``).

The learning rate: 10⁻⁴ by default. The factors of a whitened low-rank layer and a MoDeGPT model's
shrunk layers are not robust to larger steps: healing a ``modegpt`` (type I, ``factored=fisher-whiten``)
+ ``global`` model at 0.4 of the reference model, the held-out KL fell at every measurement at
10⁻⁴, rose by 6 % within 25 steps at 3·10⁻⁴ and only recovered as the cosine decayed, rose once the warm-up passed ~2·10⁻⁴ (warm-up 100),
and tripled at 10⁻³ (``benchmarks/results/heal-sweep-lr.md``, ``heal-sweep-lr2.md``). At 10⁻⁴, 1200
steps of 8 × 128 tokens (1,107 and ≈ 950 CPU-seconds with the teacher pass) heal ``modegpt`` type III
(``attention=value``, ``value_metric=o_proj``) + ``global`` from 13.34 to 13.14 at 0.4 and from 14.62 to
13.69 at 0.6 (held-out ``pycode-eval``, dense 12.93; ``heal-frontier.md``), the held-out KL still
falling at the last step; 2,100 steps of 4 × 256 tokens with the teacher cached once on the
text's 1,184 tiles reach 13.59 at 0.6 in 1,183 CPU-seconds (``heal-frontier-tiled256.md``).

Resuming: with a work directory, the trained tensors, the AdamW state, the step and the random
state are checkpointed every ``checkpoint_every`` steps; calling :func:`heal` again with the same
work directory and configuration continues from the last checkpoint and ends with the same weights
as an uninterrupted run. The training windows and their teacher distributions come from the cache,
so a resumed run sees exactly the batches the first one would have.

    cache = build_teacher_cache(teacher, windows, "work/teacher", top_k=64)
    del teacher
    history = heal(student, cache, HealConfig(steps=300), work_dir="work")
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapt.decompose import balance
from ..configs import config_to_dict
from ..errors import LowrankError
from ..nn import LowRankLinear
from ..nn.lowrank_quant_linear import LowRankQuantLinear, LowRankQuantSparseLinear
from ..nn.lowrank_sparse_linear import LowRankPlusSparseLinear
from ..nn.replacement import ReplacementLinear
from .pretrain import learning_rate_factor, optimizer_state_bytes

CACHE_VERSION = 1
CHECKPOINT = "checkpoint.pt"
# Fields of HealConfig that change neither the batches nor the updates: a run may resume with
# other values of them.
RESUMABLE_FIELDS = ("checkpoint_every",)


@dataclass
class HealConfig:
    """Options of :func:`heal`.

    Attributes:
        steps: optimizer steps.
        batch_size: windows per step.
        seq_len: tokens per window (the cache's windows must have this length).
        learning_rate: peak AdamW learning rate (linear warm-up, then cosine decay to 10 %); 10⁻⁴, the
            largest at which the held-out KL of the reference model's low-rank and MoDeGPT layers fell
            steadily (see the module's docstring).
        warmup_steps: steps of linear warm-up.
        weight_decay: AdamW's decoupled weight decay.
        max_grad_norm: gradient-norm clipping (0: none).
        temperature: softens teacher and student alike; the loss is scaled by its square.
        top_k: teacher tokens kept per position in the cache (the rest is one "tail" outcome).
        train_norms: also train the normalization layers' weights.
        hard_weight: weight α of the next-token cross-entropy on the training windows themselves
            (Hinton et al.'s "hard target" term); the loss is (1 − α) · KL + α · cross-entropy. 0
            (default): pure distillation, the student reproduces the teacher. α > 0 also fits the
            text: healing the reference model's ``modegpt`` type III + ``global`` at 0.4 with α = 0.1
            reached 13.03 held-out perplexity in 900 steps where pure distillation stopped at 13.14
            (``benchmarks/results/heal-frontier-hard900.md``), further from the teacher (training
            KL 0.0090 against 0.0034).
        seed: seeds the window sampling (:func:`lowrank.calibration.sample_windows`) and dropout.
        checkpoint_every: steps between checkpoints in the work directory.
        eval_every: with a validation cache passed to :func:`heal`, steps between held-out KL
            measurements (the best one's parameters are kept); 0: no validation.
        version: format version of this config.

    Example:
        >>> HealConfig(steps=300, learning_rate=1e-4).top_k
        64
    """

    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    learning_rate: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    top_k: int = 64
    train_norms: bool = True
    hard_weight: float = 0.0
    seed: int = 0
    checkpoint_every: int = 50
    eval_every: int = 0
    version: int = 1

    def validate(self) -> None:
        """Raise a one-line :class:`LowrankError` for an unusable setting."""
        checks = [
            (self.steps >= 1 and self.batch_size >= 1, f"steps and batch size must be ≥ 1, got {self.steps} and {self.batch_size}"),
            (self.seq_len >= 2, f"seq_len must be ≥ 2, got {self.seq_len}"),
            (0 < self.learning_rate < float("inf"), f"learning rate must be a positive number, got {self.learning_rate}"),
            (
                self.warmup_steps >= 0 and self.weight_decay >= 0 and self.max_grad_norm >= 0,
                "warm-up steps, weight decay and max grad norm must be ≥ 0",
            ),
            (0 < self.temperature < float("inf"), f"temperature must be a positive number, got {self.temperature}"),
            (self.top_k >= 1, f"top_k must be ≥ 1, got {self.top_k}"),
            (0 <= self.hard_weight <= 1, f"hard_weight must lie in [0, 1] (0: pure distillation), got {self.hard_weight}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be ≥ 1, got {self.checkpoint_every}"),
            (self.eval_every >= 0, f"eval_every must be ≥ 0 (0: no validation), got {self.eval_every}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LowrankError(message)


@dataclass
class HealHistory:
    """What :func:`heal` measured (carried across resumes).

    Attributes:
        losses: distillation loss of every step so far (the top-k KL, times T²; without the
            cross-entropy term of ``hard_weight``).
        seconds: training wall time of every step so far, cumulative (resumed runs continue the count).
        resumed_from: the step this call started from (0 for a fresh run).
        trainable_parameters: values the optimizer updates.
        trainable_names: names of the trained parameters.
        optimizer_bytes: memory of the AdamW moments (exact, from the optimizer's tensors).
        validation: (step, held-out loss) of every validation measurement, step 0 before training:
            the KL, or with ``hard_weight`` the mixed objective (:func:`held_out_loss`).
        best_step: the step whose parameters the student ends with (with validation; else the last step).
    """

    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    resumed_from: int = 0
    trainable_parameters: int = 0
    trainable_names: list[str] = field(default_factory=list)
    optimizer_bytes: int = 0
    validation: list[tuple[int, float]] = field(default_factory=list)
    best_step: int = 0

    @property
    def steps(self) -> int:
        return len(self.losses)

    def mean_loss(self, first: int | None = None, last: int | None = None) -> float:
        """Mean loss of the first or the last ``n`` steps (less noisy than one step)."""
        values = self.losses[:first] if first is not None else self.losses[-(last or len(self.losses)) :]
        return sum(values) / max(len(values), 1)


def topk_kl(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, teacher_indices: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student) on the teacher's top-k tokens plus one tail outcome.

    Args:
        student_logits: (..., V) raw logits of the student.
        teacher_log_probs: (..., k) the teacher's log-probabilities at temperature ``temperature``
            (log-softmax of its logits / T) of its top-k tokens.
        teacher_indices: (..., k) the vocabulary indices of those tokens.
        temperature: the softening T the teacher's values were computed with; the student's
            logits are divided by it too, and the result is multiplied by T².

    Returns:
        A scalar: T² · mean over positions of Σ_k p (log p − log q) + p_tail (log p_tail − log q_tail).

    Example:
        >>> logits = torch.randn(3, 10)
        >>> values, indices = torch.log_softmax(logits, -1).topk(10)
        >>> float(topk_kl(logits, values, indices)) < 1e-6
        True
    """
    vocab = student_logits.shape[-1]
    student = torch.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)  # (N, V)
    teacher = teacher_log_probs.float().reshape(student.shape[0], -1)  # (N, k)
    indices = teacher_indices.long().reshape(student.shape[0], -1)  # (N, k)
    student_top = student.gather(-1, indices)  # (N, k)
    teacher_probs = teacher.exp()
    head = (teacher_probs * (teacher - student_top)).sum(-1)  # (N,)
    # The tail masses as 1 − Σ top-k: no log of a sum over an empty set when k = V (which would
    # give NaN gradients), and float32 cancellation errors (~1e-7) are far below the masses that matter.
    teacher_tail = (1 - teacher_probs.sum(-1)).clamp_min(0)
    student_tail = (1 - student_top.exp().sum(-1)).clamp_min(torch.finfo(torch.float32).tiny)
    tail = torch.xlogy(teacher_tail, teacher_tail) - teacher_tail * student_tail.log()
    return (head + tail).mean() * temperature**2


def next_token_cross_entropy(logits: torch.Tensor, windows: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each window's next tokens under ``logits`` (B, T, V) of ``windows`` (B, T), in float32."""
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), windows[:, 1:].reshape(-1), reduction=reduction)


def is_norm(module: nn.Module) -> bool:
    """A normalization layer: ``nn.LayerNorm``/``nn.GroupNorm``, or any class named ``...Norm`` (``LlamaRMSNorm``, ...)."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith("Norm")


# Float parameters of a compressed layer that healing keeps as they are. The outliers of a
# dense-and-sparse layer belong to its quantized base, not to the correction: they are the entries the
# quantizer could not hold, fixed beside the codes (SqueezeLLM), and healing trains the low-rank
# factors around that fixed base as it does around a LowRankQuantLinear's codes (LQ-LoRA).
FROZEN_PARAMETERS = {LowRankQuantSparseLinear: ("sparse_values",)}


def prepare_heal_(model: nn.Module, train_norms: bool = True) -> list[str]:
    """Make the compressed layers' float parameters (and the norms') trainable, freeze the rest (in place).

    Args:
        model: a model compressed by :func:`lowrank.compress_` or loaded by :func:`lowrank.load`.
        train_norms: also train the normalization layers' weights (and biases).

    Returns:
        The names of the trainable parameters.

    Raises:
        LowrankError: if the model has no compressed layer.

    Example:
        >>> names = prepare_heal_(compressed)  # doctest: +SKIP
        >>> names[0]  # doctest: +SKIP
        'model.layers.0.self_attn.q_proj.down.weight'
    """
    replaced = [module for module in model.modules() if isinstance(module, ReplacementLinear)]
    if not replaced:
        raise LowrankError("the model has no compressed layers to heal; compress it first (lowrank.compress_ or `lowrank compress`)")
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, ReplacementLinear) or (train_norms and is_norm(module)):
            frozen = next((names for structure, names in FROZEN_PARAMETERS.items() if isinstance(module, structure)), ())
            for name, parameter in module.named_parameters():
                if parameter.is_floating_point() and name not in frozen:  # quantized codes and sparse indices are buffers, but be sure
                    parameter.requires_grad_(True)
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


# Structures whose low-rank part is ``up(down(x))`` with two nn.Linear children.
PRODUCT_STRUCTURES = (LowRankLinear, LowRankPlusSparseLinear, LowRankQuantLinear, LowRankQuantSparseLinear)


def balance_factors_(model: nn.Module) -> int:
    """Rescale every low-rank product so that each component's ``up`` column and ``down`` row have equal norms (in place).

    Why: a whitened factorization returns factors whose entries are orders of magnitude apart
    (the whitening's inverse lands in ``down``, the singular values in ``up``). AdamW moves every
    entry by about the learning rate whatever its size, so one step is a large change of ``down``
    and almost none of ``up``: healing the reference model without this step made the held-out
    KL grow at the learning rates tried. Balanced factors (the U√Σ, √Σ Vᵀ split) train evenly.
    The product is unchanged up to rounding (each rank-1 term is scaled by c and 1/c), and the
    components keep their order, so an ``--elastic`` model still truncates to nested ranks.

    Returns:
        The number of layers rescaled.

    Example:
        >>> layer = LowRankLinear(8, 4, rank=2)
        >>> with torch.no_grad():
        ...     _ = layer.down.weight.mul_(1e-3)
        >>> balance_factors_(layer)
        1
        >>> torch.allclose(layer.up.weight.norm(dim=0), layer.down.weight.norm(dim=1))
        True
    """
    count = 0
    for module in model.modules():
        if isinstance(module, PRODUCT_STRUCTURES) and module.rank > 0:
            up, down = module.up.weight, module.down.weight
            factors = balance(up.detach().double(), down.detach().double())
            with torch.no_grad():
                up.copy_(factors.up.to(up.dtype))
                down.copy_(factors.down.to(down.dtype))
            count += 1
    return count


class TeacherCache:
    """The teacher's top-k log-probabilities over the training windows, memory-mapped from a directory.

    Files: ``windows.npy`` (N, T) token ids, ``log_probs.npy`` (N, T, k) float32,
    ``indices.npy`` (N, T, k) int32, and ``meta.json`` (written last: a directory without it is
    an unfinished cache). Build one with :func:`build_teacher_cache`.

    Attributes:
        directory: where the files are.
        meta: ``meta.json``'s contents (version, shapes, top_k, temperature, vocab_size, fingerprint, teacher).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        meta_file = self.directory / "meta.json"
        if not meta_file.is_file():
            raise LowrankError(f"{self.directory} holds no finished teacher cache (meta.json missing); build it again")
        try:
            self.meta = json.loads(meta_file.read_text())
            self.windows = np.load(self.directory / "windows.npy", mmap_mode="r")
            self.log_probs = np.load(self.directory / "log_probs.npy", mmap_mode="r")
            self.indices = np.load(self.directory / "indices.npy", mmap_mode="r")
        except (OSError, ValueError, json.JSONDecodeError) as error:
            raise LowrankError(f"the teacher cache in {self.directory} is damaged ({error}); delete it and build it again") from None
        if self.meta.get("version") != CACHE_VERSION or self.log_probs.shape[:2] != self.windows.shape or self.indices.shape != self.log_probs.shape:
            raise LowrankError(f"the teacher cache in {self.directory} is damaged or of another version; delete it and build it again")

    def __len__(self) -> int:
        return self.windows.shape[0]

    @property
    def seq_len(self) -> int:
        return self.windows.shape[1]

    @property
    def top_k(self) -> int:
        return self.log_probs.shape[2]

    @property
    def temperature(self) -> float:
        return float(self.meta["temperature"])

    def rows(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Windows (B, T), teacher log-probabilities (B, T, k) and indices (B, T, k) of these rows."""
        return (
            torch.from_numpy(np.asarray(self.windows[rows])),
            torch.from_numpy(np.asarray(self.log_probs[rows])),
            torch.from_numpy(np.asarray(self.indices[rows])),
        )


def split_tokens(token_ids: torch.Tensor, held_out: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a token stream into a training part and a held-out tail (``held_out`` of its tokens).

    The parts are contiguous, so no window sampled from one overlaps a window of the other: the
    tail gives early stopping windows the student never trained on, from the calibration text
    (never from the evaluation text).

    Args:
        token_ids: (N,) token ids of the calibration text.
        held_out: fraction of the tokens in the tail, in (0, 1).

    Returns:
        ``(train, tail)``: ``token_ids[:cut]`` and ``token_ids[cut:]``.

    Raises:
        LowrankError: for a fraction outside (0, 1).

    Example:
        >>> train, tail = split_tokens(torch.arange(10), 0.2)
        >>> train.tolist(), tail.tolist()
        ([0, 1, 2, 3, 4, 5, 6, 7], [8, 9])
    """
    if not 0 < held_out < 1:
        raise LowrankError(f"the held-out fraction of the calibration text must be in (0, 1), got {held_out}")
    cut = round(token_ids.numel() * (1 - held_out))
    return token_ids[:cut], token_ids[cut:]


def windows_fingerprint(windows: torch.Tensor) -> str:
    """A short hash of token windows: a cache or checkpoint belongs to these windows only."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def _check_windows(windows: torch.Tensor) -> torch.Tensor:
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise LowrankError(f"windows must be a (count ≥ 1, length ≥ 2) tensor of token ids, got shape {tuple(windows.shape)}")
    return windows.to(torch.int64).cpu()


def _cache_identity(windows: torch.Tensor, top_k: int, temperature: float, teacher_name: str) -> dict:
    """What a cache must match to be reused: the request, not what the teacher made of it."""
    return {
        "version": CACHE_VERSION,
        "num_windows": windows.shape[0],
        "seq_len": windows.shape[1],
        "requested_top_k": top_k,
        "temperature": float(temperature),
        "windows": windows_fingerprint(windows),
        "teacher": teacher_name,
    }


def find_teacher_cache(
    directory: str | Path, windows: torch.Tensor, top_k: int = 64, temperature: float = 1.0, teacher_name: str = ""
) -> TeacherCache | None:
    """The finished cache in ``directory`` if it was built from these windows, k, temperature and teacher name, else ``None``.

    Lets a caller skip loading the teacher at all when a resumed run finds its cache.

    Example:
        >>> find_teacher_cache("work/teacher", windows, top_k=64, teacher_name="dense/") is None  # doctest: +SKIP
        True
    """
    directory = Path(directory)
    if not (directory / "meta.json").is_file():
        return None
    try:
        cache = TeacherCache(directory)
    except LowrankError:
        return None
    identity = _cache_identity(_check_windows(windows), top_k, temperature, teacher_name)
    return cache if all(cache.meta.get(key) == value for key, value in identity.items()) else None


def build_teacher_cache(
    teacher: nn.Module,
    windows: torch.Tensor,
    directory: str | Path,
    top_k: int = 64,
    temperature: float = 1.0,
    batch_size: int = 8,
    teacher_name: str = "",
    progress: bool = True,
) -> TeacherCache:
    """Run the teacher once over ``windows`` and store its top-k log-probabilities in ``directory``.

    A finished cache of the same windows, k, temperature and ``teacher_name`` already in ``directory``
    is reused as is (:func:`find_teacher_cache`); anything else there is replaced. The files are written into a temporary
    sibling and renamed at the end, and filled one batch at a time (memory: one batch of logits).

    Args:
        teacher: the dense causal LM.
        windows: (N, T) token ids.
        directory: where the cache goes.
        top_k: tokens kept per position (clipped to the vocabulary size).
        temperature: the log-probabilities are log-softmax(logits / temperature).
        batch_size: windows per teacher forward pass.
        teacher_name: recorded and compared on reuse (e.g. the teacher's directory).
        progress: show a progress bar.

    Returns:
        The :class:`TeacherCache`.

    Example:
        >>> cache = build_teacher_cache(dense, windows, "work/teacher", top_k=64)  # doctest: +SKIP
        >>> cache.rows([0, 1])[1].shape  # doctest: +SKIP
        torch.Size([2, 128, 64])
    """
    directory = Path(directory)
    windows = _check_windows(windows)
    existing = find_teacher_cache(directory, windows, top_k, temperature, teacher_name)
    if existing is not None:
        return existing
    output = teacher.get_output_embeddings()
    vocab_size = output.weight.shape[0] if output is not None else None
    meta = {**_cache_identity(windows, top_k, temperature, teacher_name), "top_k": min(top_k, vocab_size or top_k), "vocab_size": vocab_size}
    top_k = meta["top_k"]
    temporary = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        shape = (windows.shape[0], windows.shape[1], top_k)
        np.save(temporary / "windows.npy", windows.numpy())
        log_probs = np.lib.format.open_memmap(temporary / "log_probs.npy", mode="w+", dtype=np.float32, shape=shape)
        indices = np.lib.format.open_memmap(temporary / "indices.npy", mode="w+", dtype=np.int32, shape=shape)
        device = next(teacher.parameters()).device
        was_training = teacher.training
        teacher.eval()
        start = time.perf_counter()
        with torch.no_grad():
            for first in tqdm(range(0, windows.shape[0], batch_size), desc="teacher", disable=not progress, unit="batch"):
                batch = windows[first : first + batch_size].to(device)  # (B, T)
                logits = teacher(input_ids=batch, use_cache=False).logits.float()  # (B, T, V)
                values, top = torch.log_softmax(logits / temperature, dim=-1).topk(top_k, dim=-1)  # (B, T, k)
                log_probs[first : first + len(batch)] = values.cpu().numpy()
                indices[first : first + len(batch)] = top.to(torch.int32).cpu().numpy()
        teacher.train(was_training)
        log_probs.flush()
        indices.flush()
        del log_probs, indices
        (temporary / "meta.json").write_text(json.dumps({**meta, "seconds": time.perf_counter() - start}, indent=2) + "\n")
        shutil.rmtree(directory, ignore_errors=True)
        directory.parent.mkdir(parents=True, exist_ok=True)
        temporary.rename(directory)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return TeacherCache(directory)


def held_out_kl(student: nn.Module, cache: TeacherCache, batch_size: int = 8) -> float:
    """Mean top-k KL (:func:`topk_kl`, times T²) of ``student`` to the teacher over every window of ``cache``.

    Build ``cache`` from windows the student never trained on to measure generalization.

    Example:
        >>> held_out_kl(student, build_teacher_cache(dense, eval_windows, "work/eval"))  # doctest: +SKIP
        0.084
    """
    return held_out_loss(student, cache, batch_size)


def held_out_loss(student: nn.Module, cache: TeacherCache, batch_size: int = 8, hard_weight: float = 0.0) -> float:
    """The training objective of :func:`heal` on every window of ``cache``: (1 − α) · the mean top-k
    KL to the teacher + α · the mean next-token cross-entropy of the windows' own tokens (α =
    ``hard_weight``; 0: the KL alone, :func:`held_out_kl`).

    Early stopping measures this, not the KL alone: with α > 0 the student leaves the teacher for the
    text, and the KL then stops telling whether it still improves at the objective it trains on.
    """
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    kl_sum, kl_count, ce_sum, ce_count = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for first in range(0, len(cache), batch_size):
            rows = list(range(first, min(first + batch_size, len(cache))))
            windows, log_probs, indices = cache.rows(rows)
            windows = windows.to(device)
            logits = student(input_ids=windows, use_cache=False).logits
            kl_sum += topk_kl(logits, log_probs.to(device), indices.to(device), cache.temperature).item() * windows.numel()
            kl_count += windows.numel()
            if hard_weight > 0:
                ce_sum += next_token_cross_entropy(logits, windows, reduction="sum").item()
                ce_count += windows[:, 1:].numel()
    student.train(was_training)
    kl = kl_sum / kl_count
    return kl if hard_weight == 0 else (1 - hard_weight) * kl + hard_weight * ce_sum / ce_count


def _comparable(config: HealConfig) -> dict:
    return {key: value for key, value in config_to_dict(config).items() if key not in RESUMABLE_FIELDS}


def _save_checkpoint(path: Path, state: dict) -> None:
    temporary = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _load_checkpoint(
    path: Path, config: HealConfig, cache: TeacherCache, names: list[str], parameters: list[nn.Parameter], validation: TeacherCache | None = None
) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:  # a truncated or foreign file
        raise LowrankError(f"the checkpoint {path} cannot be read ({type(error).__name__}); delete it to start over") from None
    saved = {**_comparable(HealConfig()), **state["config"]}  # a field added since the checkpoint was written had its default
    differences = [key for key in _comparable(config) if saved.get(key) != _comparable(config)[key]]
    if differences:
        key = differences[0]
        raise LowrankError(
            f"{path.parent} holds a checkpoint of another healing run ({key} was {saved.get(key)!r}, now {getattr(config, key)!r}); "
            "use the same settings, another work directory, or delete it to start over"
        )
    if (
        state["cache"] != cache.meta["windows"]
        or state.get("validation_cache") != (validation.meta["windows"] if validation is not None else None)
        or state["names"] != names
        or [tuple(s) for s in state["shapes"]] != [tuple(p.shape) for p in parameters]
    ):
        raise LowrankError(
            f"{path.parent} holds a checkpoint of another model or other windows; use another work directory, or delete it to start over"
        )
    return state


def heal(
    student: nn.Module,
    cache: TeacherCache,
    config: HealConfig | None = None,
    work_dir: str | Path | None = None,
    progress: bool = True,
    until: int | None = None,
    validation: TeacherCache | None = None,
) -> HealHistory:
    """Train ``student``'s compressed layers (and norms) to match the teacher's distributions in ``cache``.

    Step ``s`` reads rows ``s·B … s·B + B − 1`` of the cache (modulo its length, so a cache of
    fewer windows than ``steps · batch_size`` is read in several epochs).

    Args:
        student: a compressed causal LM (:func:`lowrank.load` or :func:`lowrank.compress_`); trained
            in place and left in eval mode with the trained parameters requiring gradients.
        cache: the teacher's distributions (:func:`build_teacher_cache`), at ``config.seq_len``.
        config: a :class:`HealConfig` (default: its defaults).
        work_dir: where checkpoints go; a checkpoint already there (same config, cache and model)
            is resumed. ``None``: no checkpoints.
        progress: show a progress bar with the running loss.
        until: stop after this step (checkpointed when ``work_dir`` is given); a later call with
            the same ``work_dir`` continues. ``None``: run to ``config.steps``.
        validation: the teacher's distributions on held-out windows (never trained on; not the
            evaluation text): with ``config.eval_every`` ≥ 1 the student's KL on them is measured
            before training and every ``eval_every`` steps, and a finished run ends with the
            parameters of the lowest (:attr:`HealHistory.best_step`).

    Returns:
        A :class:`HealHistory` (with a resumed run's earlier steps).

    Raises:
        LowrankError: for a model without compressed layers, a cache of another window length or
            temperature, a validation cache without ``eval_every`` (or the reverse), or a work
            directory holding another run's checkpoint.

    Example:
        >>> history = heal(student, cache, HealConfig(steps=300), work_dir="work")  # doctest: +SKIP
        >>> history.mean_loss(last=10) < history.mean_loss(first=10)  # doctest: +SKIP
        True
    """
    config = config or HealConfig()
    config.validate()
    if cache.seq_len != config.seq_len or abs(cache.temperature - config.temperature) > 1e-12:
        raise LowrankError(
            f"the teacher cache holds {cache.seq_len}-token windows at temperature {cache.temperature}, the config asks for "
            f"{config.seq_len} at {config.temperature}; build the cache with the config's values"
        )
    if (validation is not None) != (config.eval_every > 0):
        raise LowrankError("early stopping needs both a validation cache and eval_every ≥ 1 (or neither); pass both")
    if validation is not None and abs(validation.temperature - config.temperature) > 1e-12:
        raise LowrankError(f"the validation cache is at temperature {validation.temperature}, the config at {config.temperature}; build it with the config's")
    names = prepare_heal_(student, train_norms=config.train_norms)
    balance_factors_(student)  # a resumed run then overwrites the trained tensors from its checkpoint
    named = dict(student.named_parameters())  # a tied parameter once
    parameters = [named[name] for name in names]
    device = parameters[0].device
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    history = HealHistory(trainable_parameters=sum(p.numel() for p in parameters), trainable_names=names)

    best: dict | None = None  # with validation: the lowest held-out loss so far, its step and parameters (on the CPU)

    def measure(step: int) -> None:
        nonlocal best
        kl = held_out_loss(student, validation, batch_size=config.batch_size, hard_weight=config.hard_weight)
        history.validation.append((step, kl))
        if best is None or kl < best["kl"]:
            best = {"kl": kl, "step": step, "parameters": [p.detach().cpu().clone() for p in parameters]}

    checkpoint = Path(work_dir) / CHECKPOINT if work_dir is not None else None
    if checkpoint is not None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        if checkpoint.is_file():
            state = _load_checkpoint(checkpoint, config, cache, names, parameters, validation)
            with torch.no_grad():
                for parameter, saved in zip(parameters, state["parameters"]):
                    parameter.copy_(saved)
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            history.losses, history.seconds = list(state["losses"]), list(state["seconds"])
            history.resumed_from = len(history.losses)
            history.validation = [tuple(pair) for pair in state.get("validation", [])]
            if state.get("best") is not None:
                best = state["best"]

    def save_state() -> None:
        _save_checkpoint(
            checkpoint,
            {
                "config": config_to_dict(config),
                "cache": cache.meta["windows"],
                "names": names,
                "shapes": [tuple(p.shape) for p in parameters],
                "parameters": [p.detach().cpu().clone() for p in parameters],
                "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(),
                "losses": history.losses,
                "seconds": history.seconds,
                "validation_cache": validation.meta["windows"] if validation is not None else None,
                "validation": history.validation,
                "best": best,
            },
        )

    end = config.steps if until is None else max(min(until, config.steps), history.resumed_from)
    if history.resumed_from == 0:
        torch.manual_seed(config.seed)  # dropout, where a model has it; resumed runs restore the saved state
        if validation is not None:
            measure(0)  # the compressed model itself is a candidate: healing never ends worse on held-out windows
    student.train()
    elapsed = history.seconds[-1] if history.seconds else 0.0
    start = time.perf_counter()
    bar = tqdm(range(history.resumed_from, end), desc="heal", disable=not progress, unit="step", initial=history.resumed_from, total=config.steps)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * learning_rate_factor(step, config.warmup_steps, config.steps)
        rows = [(step * config.batch_size + offset) % len(cache) for offset in range(config.batch_size)]
        windows, log_probs, indices = cache.rows(rows)
        windows = windows.to(device)
        logits = student(input_ids=windows, use_cache=False).logits  # (B, T, V)
        kl = topk_kl(logits, log_probs.to(device), indices.to(device), config.temperature)
        loss = kl
        if config.hard_weight > 0:
            hard = next_token_cross_entropy(logits, windows)
            loss = (1 - config.hard_weight) * kl + config.hard_weight * hard
        loss.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.losses.append(kl.item())
        history.seconds.append(elapsed + time.perf_counter() - start)
        bar.set_postfix(kl=f"{kl.item():.4f}")
        if validation is not None and ((step + 1) % config.eval_every == 0 or step + 1 == config.steps):
            measure(step + 1)
        if checkpoint is not None and ((step + 1) % config.checkpoint_every == 0 or step + 1 == end):
            save_state()
    student.eval()
    history.best_step = len(history.losses)
    if best is not None and len(history.losses) == config.steps:  # a finished run keeps the best measurement's parameters
        with torch.no_grad():
            for parameter, saved in zip(parameters, best["parameters"]):
                parameter.copy_(saved)
        history.best_step = best["step"]
    history.optimizer_bytes = optimizer_state_bytes(optimizer, counters=False)
    return history


__all__ = [
    "HealConfig",
    "HealHistory",
    "TeacherCache",
    "balance_factors_",
    "build_teacher_cache",
    "find_teacher_cache",
    "heal",
    "held_out_kl",
    "held_out_loss",
    "is_norm",
    "prepare_heal_",
    "split_tokens",
    "topk_kl",
    "windows_fingerprint",
]
