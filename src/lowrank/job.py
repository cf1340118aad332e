"""One compression job, as the ``lowrank compress`` command runs it: options, their checks, the run.

The stages (:func:`lowrank.calibrate`, :func:`lowrank.allocate`, :func:`lowrank.compress_`,
:func:`lowrank.save`, or :func:`lowrank.blockwise.compress_blockwise` for models larger than
memory) stay plain functions; this module only decides which to call with what. Every option and
every combination of options is checked in :meth:`CompressJob.validate`, before anything is read
or written, so a typo fails in a second rather than after calibration.

Example:
    >>> job = CompressJob(model_dir=Path("../shared/fixtures/pycode-llama"), out=Path("out/p30"), calib=Path("calib.txt"))
    >>> report = job.run()  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LowrankError
from .validation import check_device, check_patterns, check_positive, check_ratio

log = logging.getLogger("lowrank")

PROPAGATE = ("dense", "compressed")

# The default recipe. On SmolLM2-135M at ratio 0.2 (`lowrank demo`), fisher-whiten + global keeps
# held-out perplexity at 1.16× dense where whiten + uniform reaches 2.6× (see the README's "Which to
# pick" for the 3-seed table): which layers keep rank decides a real model. It needs a backward pass,
# so a model without a language-model loss (an encoder), and a --blockwise run that propagates the
# compressed blocks' outputs (gradients are the dense model's), get the best recipe without gradients.
CAUSAL_RECIPE = ("fisher-whiten", "global")
FALLBACK_RECIPE = ("whiten", "uniform")
# In memory, a causal LM with gated MLPs does better still by shrinking whole modules: MoDeGPT types I
# (MLP neurons) and III (value heads, measured after the attention mix), the other layers factored by
# fisher-whiten, all sized by one global knapsack. On SmolLM2 at 0.2 / 0.4 with 64 calibration windows
# it loses 1.155× / 1.60× held-out perplexity where CAUSAL_RECIPE loses 1.30× / 2.20× (3 seeds, README
# "Which to pick"; 1.142× / 1.554× with the default of 128), and
# its MLPs are plain smaller dense layers. It has no --blockwise or --elastic form; those runs, and
# models without a gated MLP among the targeted layers, keep CAUSAL_RECIPE.
MODULE_RECIPE = ("modegpt", "global")
MODULE_OPTIONS = ("factored=fisher-whiten", "attention=value", "value_metric=o_proj")
# It needs calibration tokens: on SmolLM2 at 0.2 with 16 × 256 it lost to CAUSAL_RECIPE (1.47× vs
# 1.37×, quality-calib16-smollm2.md), with 64 × 256 it wins (1.155× vs 1.30×).
MODULE_MIN_TOKENS = 64 * 256


def default_recipe(
    causal: bool, dense_gradients: bool = True, calibrated: bool = True, method: str | None = None, allocate: str | None = None, modules: bool = False
) -> tuple[str, str]:
    """``(method, allocation)`` with the unset ones (``None``) filled in for this kind of model and run.

    ``modules``: the run may shrink whole modules (in memory, gated MLPs among the targets); then an
    unset method with ``global`` (or unset) allocation is :data:`MODULE_RECIPE`, whose options are
    :data:`MODULE_OPTIONS`. Without calibration text the allocation defaults to ``uniform`` (the
    others read statistics).

    Example:
        >>> default_recipe(causal=True)
        ('fisher-whiten', 'global')
        >>> default_recipe(causal=True, modules=True)
        ('modegpt', 'global')
        >>> default_recipe(causal=True, modules=True, allocate="uniform")
        ('fisher-whiten', 'uniform')
        >>> default_recipe(causal=True, calibrated=False, method="svd")
        ('svd', 'uniform')
        >>> default_recipe(causal=False)
        ('whiten', 'uniform')
    """
    best = CAUSAL_RECIPE if causal and dense_gradients else FALLBACK_RECIPE
    if best is CAUSAL_RECIPE and modules and calibrated and method is None and allocate in (None, MODULE_RECIPE[1]):
        best = MODULE_RECIPE
    return method or best[0], allocate or (best[1] if calibrated else "uniform")


def has_gated_mlps(model_dir: Path, include: list[str] | None, exclude: list[str] | None) -> bool:
    """Whether the model of ``model_dir/config.json`` has a gated MLP (gate/up/down) among the
    layers ``--include``/``--exclude`` target; read from an empty (meta) model, no weights loaded.
    A model transformers cannot build without its own code, or a selection that targets nothing
    (validation reports it later), counts as having none."""
    from .blockwise.checkpoint import empty_model
    from .methods.modegpt import find_mlp_units
    from .nn import find_targets

    try:
        model = empty_model(model_dir)
        return bool(find_mlp_units(model, find_targets(model, include=include, exclude=exclude)))
    except (LowrankError, ValueError, KeyError, OSError):
        return False


@dataclass
class CompressJob:
    """Everything ``lowrank compress`` takes; the fields mirror its options (see ``lowrank compress --help``)."""

    model_dir: Path
    out: Path
    method: str | None = None  # None: default_recipe for the model, filled in by validate()
    ratio: float = 0.3
    calib: Path | None = None
    num_samples: int | None = None  # None: 128 windows or 1024 lines (calibration.formats.DEFAULT_SAMPLES)
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    calib_format: str = "plain"
    calib_unit: str | None = None  # None: "line" for encoders, "window" for causal LMs
    allocate: str | None = None  # None: default_recipe
    include: list[str] | None = None
    exclude: list[str] | None = None
    elastic: bool = False
    sequential: bool = False
    anchor: float | None = None  # with sequential: the cross-layer correction's α (None: the plain refit)
    options: list[str] = field(default_factory=list)
    device: str = "cpu"
    dtype: str | None = None
    blockwise: bool = False
    propagate: str = "dense"
    resume: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False

    def validate(self) -> tuple[Any, Any]:
        """Check every option and every combination; return the method and its parsed config.

        Raises:
            LowrankError: one line naming the problem and the fix.
        """
        from .allocation import strategy_names, strategy_needs_batches, strategy_needs_gradients
        from .allocation.elastic import ELASTIC_STRATEGIES
        from .blockwise.pipeline import BLOCKWISE_STRATEGIES
        from .calibration.formats import CALIB_FORMATS, CALIB_UNITS, has_chat_template
        from .configs import parse_overrides
        from .io.paths import check_output
        from .methods import get_method
        from .gguf import resolve_model_dir
        from .models import DTYPES, is_causal_lm, load_config

        check_ratio(self.ratio)
        check_positive(num_samples=self.num_samples, seq_len=self.seq_len, batch_size=self.batch_size)
        check_patterns(include=self.include, exclude=self.exclude)
        check_device(self.device)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise LowrankError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.calib_format not in CALIB_FORMATS:
            raise LowrankError(f"--calib-format must be one of {', '.join(CALIB_FORMATS)}, got {self.calib_format!r}")
        if self.calib_unit is not None and self.calib_unit not in CALIB_UNITS:
            raise LowrankError(f"--calib-unit must be one of {', '.join(CALIB_UNITS)}, got {self.calib_unit!r}")
        if self.propagate not in PROPAGATE:
            raise LowrankError(f"--propagate must be one of {', '.join(PROPAGATE)}, got {self.propagate!r}")
        if self.allocate is not None and self.allocate not in strategy_names():
            raise LowrankError(f"unknown allocation strategy {self.allocate!r}; choose one of: {', '.join(strategy_names())}")
        if self.method is not None:
            get_method(self.method)  # an unknown name fails before any file is read

        # Paths: the output must not destroy an input, and the input must be a model. A .gguf input
        # is converted once (cached) and the job reads the converted directory from then on.
        inputs = [self.model_dir] + ([self.calib] if self.calib is not None else [])
        check_output(self.out, inputs, self.overwrite)
        self.model_dir = resolve_model_dir(self.model_dir)
        check_output(self.out, [self.model_dir, *inputs], self.overwrite)
        model_config = load_config(self.model_dir, self.trust_remote_code)
        if self.method is None and self.calib is None:
            raise LowrankError("the default recipe calibrates on text: pass --calib FILE (a UTF-8 text file), or --method svd to compress without data")
        if self.method is None or self.allocate is None:
            from .calibration.formats import DEFAULT_SAMPLES  # imports torch: not at module level

            causal = is_causal_lm(model_config)
            dense_gradients = not (self.blockwise and self.propagate == "compressed")
            chosen = self.method is None
            enough = self.calib_unit != "line" and (self.num_samples or DEFAULT_SAMPLES["window"]) * self.seq_len >= MODULE_MIN_TOKENS
            modules = causal and chosen and enough and not (self.blockwise or self.elastic) and has_gated_mlps(self.model_dir, self.include, self.exclude)
            self.method, self.allocate = default_recipe(causal, dense_gradients, self.calib is not None, self.method, self.allocate, modules)
            recipe_options = list(MODULE_OPTIONS) if chosen and (self.method, self.allocate) == MODULE_RECIPE else []
            self.options = [*recipe_options, *self.options]  # the user's --option comes last and wins
            log.info("recipe: --method %s --allocate %s%s", self.method, self.allocate, "".join(f" --option {o}" for o in recipe_options))
        if self.allocate not in strategy_names():
            raise LowrankError(f"unknown allocation strategy {self.allocate!r}; choose one of: {', '.join(strategy_names())}")
        spec = get_method(self.method)
        options = list(self.options)
        precision = "precision" in {f.name for f in dataclasses.fields(spec.config_class)}
        if self.device.startswith("cuda") and precision and not any(o.startswith("precision=") for o in options):
            options.append("precision=float32")  # float64 is slow on GPUs; float32 SVD of a whitened matrix is accurate enough
        config = parse_overrides(spec.config_class, options)
        sequential = self.sequential or spec.sequential
        gradients = spec.needs_gradients or strategy_needs_gradients(self.allocate)
        if self.anchor is not None and not (sequential and 0.0 <= self.anchor <= 1.0):
            raise LowrankError(f"--anchor takes a value in [0, 1] and needs --sequential (or a sequential method), got {self.anchor}")

        # Flag combinations.
        if self.blockwise:
            if self.allocate not in BLOCKWISE_STRATEGIES or self.elastic or sequential:
                raise LowrankError(
                    f"--blockwise compresses with --allocate {' or '.join(BLOCKWISE_STRATEGIES)} and without --elastic or --sequential; drop those options or --blockwise"
                )
            if gradients and self.propagate != "dense":
                raise LowrankError("gradients block by block are the dense model's: use --propagate dense with --allocate global or a gradient method")
        else:
            if self.propagate != "dense":
                raise LowrankError("--propagate chooses what --blockwise calibrates on; add --blockwise or drop --propagate")
            if self.resume:
                raise LowrankError("--resume continues a --blockwise run; add --blockwise")
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would compress the whole model to the same --out
                raise LowrankError("torchrun shares only --blockwise compression among processes; add --blockwise, or run without torchrun")
        if self.elastic:
            if not spec.nested:
                raise LowrankError(f"--elastic needs a method whose smaller ranks are prefixes of its factors; {self.method!r} is not; use svd, whiten or fisher-whiten")
            if self.allocate not in ELASTIC_STRATEGIES:
                raise LowrankError(f"--elastic resizes with --allocate {' or '.join(ELASTIC_STRATEGIES)}, not {self.allocate!r}")
        if (spec.needs_statistics or gradients or sequential or strategy_needs_batches(self.allocate)) and self.calib is None:
            raise LowrankError(f"method {self.method!r} with --allocate {self.allocate} needs calibration data; pass --calib FILE (a UTF-8 text file)")

        if self.calib_unit == "line" or self.calib_format == "chat":
            if self.calib_unit == "line" and self.calib_format == "chat":
                raise LowrankError("--calib-format chat renders conversations to cut windows from; use it with --calib-unit window")
            if self.calib_unit == "line" and (self.blockwise or sequential):
                raise LowrankError("--calib-unit line (padded lines) works with in-memory, one-shot compression; drop --blockwise/--sequential or use --calib-unit window")
            if self.calib is None:
                flag = "--calib-unit line" if self.calib_unit == "line" else "--calib-format chat"
                raise LowrankError(f"{flag} shapes calibration text; pass --calib FILE or drop {flag}")

        if self.calib_format == "chat":
            from .models import load_tokenizer

            tokenizer = load_tokenizer(self.model_dir, trust_remote_code=self.trust_remote_code)
            if tokenizer is None or not has_chat_template(tokenizer):
                raise LowrankError(
                    f"--calib-format chat needs the model's chat template, and {self.model_dir} has {'no tokenizer' if tokenizer is None else 'a tokenizer without one'}; "
                    "use --calib-format plain (the default)"
                )
        return spec, config

    def uses_calibration(self, spec) -> bool:
        """Whether the calibration text changes the result (``svd`` with uniform ranks reads none)."""
        from .allocation import strategy_needs_batches, strategy_needs_gradients

        wanted = spec.reads_statistics or self.sequential or spec.sequential or self.allocate != "uniform"
        return self.calib is not None and (wanted or strategy_needs_gradients(self.allocate) or strategy_needs_batches(self.allocate))

    def run(self):
        """Validate, then calibrate → allocate → factorize → save; returns the :class:`CompressionReport`."""
        spec, config = self.validate()
        if self.calib is not None and not self.uses_calibration(spec):
            log.info("%s with --allocate %s reads no calibration data; --calib is not used", self.method, self.allocate)
            self.calib = None
        if self.blockwise:
            return self._run_blockwise(config)
        return self._run_in_memory(spec, config)

    def _tokenizer_and_text(self):
        from .calibration import read_text
        from .models import load_tokenizer

        text = read_text(self.calib) if self.calib is not None else None
        tokenizer = load_tokenizer(self.model_dir, trust_remote_code=self.trust_remote_code)
        if text is not None and tokenizer is None:
            raise LowrankError(f"{self.model_dir} has no tokenizer files; calibration needs the model's tokenizer")
        return tokenizer, text

    def _batches(self, tokenizer, text, model=None):
        """Calibration batches; the unit defaults to lines for an encoder ``model`` and windows otherwise."""
        from .calibration.formats import DEFAULT_SAMPLES, calibration_inputs, default_unit

        unit = self.calib_unit or (default_unit(model) if model is not None else "window")
        causal = model is None or default_unit(model) == "window"
        num_samples = self.num_samples or DEFAULT_SAMPLES[unit]
        return calibration_inputs(
            tokenizer, text, unit, self.calib_format, num_samples, self.seq_len, self.seed, self.batch_size, labels=causal
        )  # fmt: skip

    def _run_in_memory(self, spec, config):
        import lowrank

        from .allocation import elastic_plan, strategy_needs_batches, strategy_needs_gradients
        from .compress import cast_
        from .calibration.formats import collect_masked_statistics
        from .methods.registry import output_gram_layers
        from .models import DTYPES, load_pretrained

        tokenizer, text = self._tokenizer_and_text()
        model = load_pretrained(self.model_dir, device=self.device, trust_remote_code=self.trust_remote_code)
        targets = lowrank.find_targets(model, include=self.include, exclude=self.exclude)
        stats = None
        batches = self._batches(tokenizer, text, model) if text is not None else None
        if batches is not None:
            gradients = spec.needs_gradients or strategy_needs_gradients(self.allocate)
            gram = output_gram_layers(spec, model, targets, config) if gradients else []
            stats = collect_masked_statistics(
                model, batches, targets, gradients=gradients, weight_gradients=spec.needs_weight_gradients, output_gram=gram
            )  # fmt: skip
        if self.elastic:
            plan = elastic_plan(model, method=self.method, stats=stats, strategy=self.allocate, include=self.include, exclude=self.exclude)
        else:
            plan = lowrank.allocate(
                model, self.ratio, method=self.method, stats=stats, strategy=self.allocate, include=self.include, exclude=self.exclude,
                batches=batches if strategy_needs_batches(self.allocate) else None, method_config=config,
            )  # fmt: skip
        sequential = batches if (self.sequential or spec.sequential) else None
        report = lowrank.compress_(model, plan, method=self.method, stats=stats, config=config, sequential=sequential, anchor=self.anchor)
        if self.dtype is not None:
            cast_(model, DTYPES[self.dtype], report.parameters, report.plan.shapes)  # the report then counts the bits as saved
        lowrank.save(model, self.out, report=report, tokenizer=tokenizer, overwrite=self.overwrite)
        return report

    def _run_blockwise(self, config):
        from .blockwise import compress_blockwise

        tokenizer, text = self._tokenizer_and_text()
        batches = self._batches(tokenizer, text) if text is not None else None
        return compress_blockwise(
            self.model_dir, self.out, self.ratio, method=self.method, config=config, batches=batches, include=self.include,
            exclude=self.exclude, propagate=self.propagate, device=self.device, dtype=self.dtype, tokenizer=tokenizer,
            resume=self.resume, overwrite=self.overwrite, strategy=self.allocate,
        )  # fmt: skip
