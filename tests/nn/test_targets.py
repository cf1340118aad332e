import pytest

import lowrank
from lowrank.errors import LowrankError
from lowrank.nn import find_blocks
from tiny_models import FAMILIES, tiny_model

EXPECTED_PER_BLOCK = {"llama": 7, "qwen2": 7, "gpt2": 4, "opt": 6}


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_are_the_linears_in_the_blocks(family):
    model = tiny_model(family)
    (stack, blocks), = find_blocks(model)
    targets = lowrank.find_targets(model)
    assert len(targets) == EXPECTED_PER_BLOCK[family] * len(blocks)
    assert all(name.startswith(stack + ".") for name in targets)
    assert not any("lm_head" in name or "embed" in name for name in targets)


def test_include_can_ask_for_the_lm_head_and_exclude_removes():
    model = tiny_model("llama")
    assert lowrank.find_targets(model, include=[r"lm_head"]) == ["lm_head"]
    targets = lowrank.find_targets(model, exclude=[r"mlp\."])
    assert targets and not any(".mlp." in name for name in targets)


def test_include_matching_nothing_is_a_clear_error():
    with pytest.raises(LowrankError, match="matches no linear layer"):
        lowrank.find_targets(tiny_model("llama"), include=["no_such_layer"])


def test_excluding_everything_is_a_clear_error():
    with pytest.raises(LowrankError, match="no linear layer is selected"):
        lowrank.find_targets(tiny_model("llama"), exclude=["."])
