"""Flag combinations of ``lowrank compress``: every rule in CompressJob.validate, checked as a table."""

from __future__ import annotations

import pytest
from shared_data import CALIB, FIXTURE, needs_shared

from lowrank.errors import LowrankError
from lowrank.job import CompressJob


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_models import tiny_model

    directory = tmp_path_factory.mktemp("job") / "model"
    tiny_model("llama").save_pretrained(directory)
    return directory


CALIBRATED = {"calib": CALIB}

# (name, options, words of the error, or None when the combination is valid)
COMBINATIONS = [
    ("defaults with calibration", {**CALIBRATED}, None),
    ("defaults without calibration", {}, "default recipe calibrates"),
    ("whiten without calibration", {"method": "whiten"}, "needs calibration data"),
    ("svd without calibration", {"method": "svd"}, None),
    ("global without calibration", {"method": "svd", "allocate": "global"}, "needs calibration data"),
    ("sensitivity without calibration", {"method": "svd", "allocate": "sensitivity"}, "needs calibration data"),
    ("energy without calibration", {"method": "svd", "allocate": "energy"}, None),
    ("fisher-whiten without calibration", {"method": "fisher-whiten"}, "needs calibration data"),
    ("sequential svd without calibration", {"method": "svd", "sequential": True}, "needs calibration data"),
    ("whiten-refit with calibration", {"method": "whiten-refit", **CALIBRATED}, None),
    ("blockwise uniform", {"blockwise": True, **CALIBRATED}, None),
    ("blockwise global", {"blockwise": True, "allocate": "global", **CALIBRATED}, None),
    ("blockwise energy", {"blockwise": True, "allocate": "energy", **CALIBRATED}, "--blockwise"),
    ("blockwise global, compressed propagation", {"blockwise": True, "allocate": "global", "propagate": "compressed", **CALIBRATED}, "--propagate dense"),
    ("blockwise elastic", {"blockwise": True, "elastic": True, **CALIBRATED}, "--blockwise"),
    ("blockwise sequential", {"blockwise": True, "sequential": True, **CALIBRATED}, "--blockwise"),
    ("blockwise fisher-whiten", {"blockwise": True, "method": "fisher-whiten", **CALIBRATED}, None),
    ("blockwise whiten-refit", {"blockwise": True, "method": "whiten-refit", **CALIBRATED}, "--blockwise"),
    ("blockwise resume", {"blockwise": True, "resume": True, **CALIBRATED}, None),
    ("blockwise compressed propagation", {"blockwise": True, "propagate": "compressed", **CALIBRATED}, None),
    ("resume without blockwise", {"resume": True, **CALIBRATED}, "--resume"),
    ("propagate without blockwise", {"propagate": "compressed", **CALIBRATED}, "--propagate"),
    ("unknown propagation", {"blockwise": True, "propagate": "sideways", **CALIBRATED}, "--propagate must be"),
    ("elastic default recipe", {"elastic": True, **CALIBRATED}, None),
    ("elastic whiten", {"elastic": True, "method": "whiten", **CALIBRATED}, None),
    ("elastic global", {"elastic": True, "allocate": "global", **CALIBRATED}, None),
    ("elastic energy", {"elastic": True, "allocate": "energy", **CALIBRATED}, "--elastic resizes"),
    ("elastic lowrank-sparse", {"elastic": True, "method": "lowrank-sparse"}, "--elastic needs"),
    ("elastic lowrank-quant", {"elastic": True, "method": "lowrank-quant"}, "--elastic needs"),
    ("elastic dictionary", {"elastic": True, "method": "dictionary"}, "--elastic needs"),
    ("elastic whiten-refit", {"elastic": True, "method": "whiten-refit", **CALIBRATED}, "--elastic needs"),
    ("dtype bfloat16", {"method": "svd", "dtype": "bfloat16"}, None),
    ("dtype int4", {"method": "svd", "dtype": "int4"}, "--dtype"),
    ("option for another method", {"method": "svd", "options": ["damp=0.1"]}, "bad --option"),
    ("option precision on cpu", {"method": "svd", "options": ["precision=float32"]}, None),
    ("window unit", {"calib_unit": "window", **CALIBRATED}, None),
    ("line unit", {"calib_unit": "line", **CALIBRATED}, None),
    ("line unit with global allocation", {"calib_unit": "line", "method": "fisher-whiten", "allocate": "global", **CALIBRATED}, None),
    ("unknown unit", {"calib_unit": "page", **CALIBRATED}, "--calib-unit must be"),
    ("line unit without calibration", {"method": "svd", "calib_unit": "line"}, "pass --calib"),
    ("line unit blockwise", {"calib_unit": "line", "blockwise": True, **CALIBRATED}, "--calib-unit window"),
    ("line unit sequential", {"calib_unit": "line", "sequential": True, **CALIBRATED}, "--calib-unit window"),
    ("line unit whiten-refit", {"calib_unit": "line", "method": "whiten-refit", **CALIBRATED}, "--calib-unit window"),
    ("line unit chat", {"calib_unit": "line", "calib_format": "chat", **CALIBRATED}, "--calib-unit window"),
    ("unknown format", {"calib_format": "markdown", **CALIBRATED}, "--calib-format must be"),
    ("chat without calibration", {"method": "svd", "calib_format": "chat"}, "pass --calib"),
    ("chat without a tokenizer", {"calib_format": "chat", **CALIBRATED}, "chat template"),
]


@pytest.mark.parametrize("name, options, error", COMBINATIONS, ids=[row[0] for row in COMBINATIONS])
def test_flag_combinations(name, options, error, model_dir, tmp_path):
    job = CompressJob(model_dir=model_dir, out=tmp_path / "out", **options)
    if error is None:
        spec, config = job.validate()
        assert spec.name == job.method
    else:
        with pytest.raises(LowrankError, match=error.replace("-", r"\-")):
            job.validate()
    assert not (tmp_path / "out").exists()  # validation never writes


RECIPES = [
    # (model, options, the recipe validate() fills in)
    ("llama", {**CALIBRATED}, ("modegpt", "global")),  # gated MLPs, in memory: shrink whole modules
    ("llama", {"include": [r"self_attn"], **CALIBRATED}, ("fisher-whiten", "global")),  # no gated MLP among the targets
    ("gpt-neox", {**CALIBRATED}, ("fisher-whiten", "global")),  # an MLP without a gate
    ("llama", {"elastic": True, **CALIBRATED}, ("fisher-whiten", "global")),  # modegpt has no elastic form
    ("llama", {"num_samples": 16, **CALIBRATED}, ("fisher-whiten", "global")),  # too few calibration tokens for the module recipe
    ("llama", {"num_samples": 32, "seq_len": 512, **CALIBRATED}, ("modegpt", "global")),  # 64 × 256 tokens' worth
    ("llama", {"blockwise": True, **CALIBRATED}, ("fisher-whiten", "global")),  # gradients block by block; modegpt runs in memory only
    ("llama", {"blockwise": True, "propagate": "compressed", **CALIBRATED}, ("whiten", "uniform")),  # gradients are the dense model's
    ("llama", {"method": "svd"}, ("svd", "uniform")),  # without text, nothing to allocate with
    ("llama", {"method": "svd", **CALIBRATED}, ("svd", "global")),
    ("llama", {"allocate": "uniform", **CALIBRATED}, ("fisher-whiten", "uniform")),
    ("bert", {**CALIBRATED}, ("whiten", "uniform")),  # an encoder returns no next-token loss
]


@pytest.mark.parametrize("family, options, recipe", RECIPES)
def test_the_default_recipe_follows_the_model_and_the_run(family, options, recipe, model_dir, tmp_path):
    import transformers

    directory = model_dir
    if family == "bert":
        directory = tmp_path / family
        config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        transformers.BertModel(config).save_pretrained(directory)
    if family == "gpt-neox":
        directory = tmp_path / family
        config = transformers.GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        transformers.GPTNeoXForCausalLM(config).save_pretrained(directory)
    job = CompressJob(model_dir=directory, out=tmp_path / "out", **options)
    spec, config = job.validate()
    assert (job.method, job.allocate) == recipe
    if job.method == "modegpt":  # the recipe's options, which a user's --option overrides
        assert (config.factored, config.attention, config.value_metric) == ("fisher-whiten", "value", "o_proj")
        job = CompressJob(model_dir=directory, out=tmp_path / "out", options=["attention=factored"], **options)
        assert job.validate()[1].attention == "factored" and job.options[-1] == "attention=factored"
        job = CompressJob(model_dir=directory, out=tmp_path / "out", method="modegpt", **options)  # a method named is taken as it is
        assert job.validate()[1].attention == "factored" and job.options == []


def test_svd_with_uniform_ranks_reads_no_calibration(model_dir, tmp_path):
    from lowrank.methods import get_method

    assert not CompressJob(model_dir=model_dir, out=tmp_path, method="svd", calib=CALIB, allocate="uniform").uses_calibration(get_method("svd"))
    assert CompressJob(model_dir=model_dir, out=tmp_path, method="svd", calib=CALIB, allocate="energy").uses_calibration(get_method("svd"))
    assert CompressJob(model_dir=model_dir, out=tmp_path, method="lowrank-sparse", calib=CALIB, allocate="uniform").uses_calibration(get_method("lowrank-sparse"))


@needs_shared
def test_chat_format_needs_the_tokenizers_chat_template(model_dir, tmp_path):
    import shutil

    from lowrank.models import load_tokenizer

    directory = tmp_path / "model"
    shutil.copytree(model_dir, directory)
    tokenizer = load_tokenizer(FIXTURE)
    tokenizer.save_pretrained(directory)
    job = CompressJob(model_dir=directory, out=tmp_path / "out", calib=CALIB, calib_format="chat")
    with pytest.raises(LowrankError, match="a tokenizer without one"):
        job.validate()
    tokenizer.chat_template = "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}{% endfor %}"
    tokenizer.save_pretrained(directory)
    job.validate()
