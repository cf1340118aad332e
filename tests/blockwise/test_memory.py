"""The lazy path never holds the model: peak resident memory stays below the checkpoint's size."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

# A Llama of ~180 M parameters in float32: a 0.73 GB checkpoint in four shards. The interpreter with
# torch and transformers imported already takes ~0.45 GB, so the remaining headroom is less than
# a third of the checkpoint; loading the model whole would need all of it.
GENERATE = """
import torch, transformers
torch.manual_seed(0)
config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=14, num_attention_heads=8,
                                  num_key_value_heads=8, vocab_size=1024, architectures=["LlamaForCausalLM"])
transformers.LlamaForCausalLM(config).save_pretrained(r"{path}", max_shard_size="200MB")
"""

COMPRESS = """
import json
from lowrank.blockwise import CheckpointReader, compress_blockwise
from lowrank.methods.svd import SVDConfig
# Only down_proj is factored: every block is still read, rebuilt and written, at a seventh of the SVDs.
report = compress_blockwise(r"{path}", r"{out}", 0.4, method="svd", config=SVDConfig(precision="float32"), include=[r"mlp\.down_proj"], progress=False)
def peak_rss():  # this process's own high-water mark; ru_maxrss would include the parent's, inherited through vfork + exec
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({{"peak": peak_rss(), "checkpoint": CheckpointReader(r"{path}").num_bytes,
                  "after": report.parameters["targeted_after"], "before": report.parameters["targeted_before"]}}))
"""


def _python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_peak_rss_stays_below_the_checkpoint_size(tmp_path):
    _python(GENERATE.format(path=tmp_path / "dense"))
    measured = json.loads(_python(COMPRESS.format(path=tmp_path / "dense", out=tmp_path / "out")).splitlines()[-1])
    assert measured["checkpoint"] > 700e6
    assert measured["peak"] < measured["checkpoint"], f"peak RSS {measured['peak'] / 1e6:.0f} MB ≥ checkpoint {measured['checkpoint'] / 1e6:.0f} MB"
    assert measured["after"] < 0.61 * measured["before"]
    weight_map = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert {name.split(".down_proj.")[1] for name in weight_map if ".down_proj." in name} == {"down.weight", "up.weight"}, sorted(weight_map)[:20]
    assert sum(".down_proj." in name for name in weight_map) == 14 * 2 and sum(".up_proj.weight" in name for name in weight_map) == 14
