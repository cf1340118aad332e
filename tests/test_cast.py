"""--dtype: a compressed model is cast after factorization, its report counts the bits as saved, and
buffers whose dtype is part of a stored format (quantization scales) keep it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import lowrank
from lowrank.compress import storage_bits
from lowrank.job import CompressJob
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cast") / "model"
    tiny_model("llama").save_pretrained(directory)
    return directory


def _saved(directory):
    config = json.loads((directory / "lowrank_config.json").read_text())
    dtypes = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            dtypes.update({key: handle.get_slice(key).get_dtype() for key in handle.keys()})  # noqa: SIM118
    return config, dtypes


@pytest.mark.parametrize("blockwise", [False, True], ids=["in-memory", "blockwise"])
def test_dtype_cast_keeps_quantization_scales_and_counts_saved_bits(model_dir, tmp_path, blockwise):
    out = tmp_path / "out"
    options = ["bits=4", "group_size=32"]
    CompressJob(model_dir=model_dir, out=out, method="lowrank-quant", ratio=0.4, options=options, dtype="bfloat16", blockwise=blockwise).run()
    config, dtypes = _saved(out)
    scales = [key for key in dtypes if key.endswith("residual_scales")]
    factors = [key for key in dtypes if key.endswith(("up.weight", "down.weight"))]
    assert scales and all(dtypes[key] == "F16" for key in scales)  # not cast to bfloat16
    assert factors and all(dtypes[key] == "BF16" for key in factors)
    loaded = lowrank.load(out)
    assert config["parameters"]["targeted_bits_after"] == sum(storage_bits(loaded.get_submodule(name)) for name in config["plan"]["shapes"])
    # The dense size is counted at the saved dtype too: 16-bit values of every targeted weight.
    shapes = config["plan"]["shapes"]
    assert config["parameters"]["targeted_bits_before"] == sum(16 * out_features * in_features for out_features, in_features in shapes.values())


def test_cast_without_fixed_buffers_matches_to(model_dir):
    model = lowrank.models.load_pretrained(model_dir)
    reference = lowrank.models.load_pretrained(model_dir).to(torch.bfloat16)
    lowrank.compress.cast_(model, torch.bfloat16)
    for (name, tensor), (_, expected) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name
