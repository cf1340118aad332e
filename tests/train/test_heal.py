"""Healing (distillation into the factors) on tiny compressed models: the loss against brute force,
what trains, that healing moves the student towards the teacher on windows it never saw, save → load,
and that an interrupted run resumed from its checkpoint ends with the weights of an uninterrupted one."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

import lowrank
from lowrank.configs import parse_overrides
from lowrank.errors import LowrankError
from lowrank.linalg.quantize import quantize_groups
from lowrank.nn import LowRankLinear
from lowrank.nn.lowrank_quant_linear import LowRankQuantSparseFactors, LowRankQuantSparseLinear
from lowrank.train.heal import HealConfig, build_teacher_cache, heal, held_out_kl, held_out_loss, prepare_heal_, split_tokens, topk_kl

VOCAB = 128  # the tiny models' vocabulary


def compressed(
    family: str = "llama", method: str = "svd", ratio: float = 0.6, options: tuple[str, ...] = ()
) -> tuple[torch.nn.Module, torch.nn.Module, object]:
    """(teacher, student, report): a tiny model and a compressed copy of it (data-free methods)."""
    teacher = tiny_model(family)
    with torch.no_grad():  # random weights give near-uniform predictions: sharpen them, so there is something to distil
        teacher.get_output_embeddings().weight.mul_(30)
    student = copy.deepcopy(teacher)
    plan = lowrank.allocate(student, ratio, method=method)
    config = parse_overrides(lowrank.get_method(method).config_class, list(options))
    report = lowrank.compress_(student, plan, method=method, config=config, progress=False)
    return teacher, student, report


def random_windows(count: int, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_at_full_vocabulary_is_the_full_kl_in_value_and_gradient(temperature):
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(3, 5, 40, generator=generator) * 3).requires_grad_()
    teacher = torch.randn(3, 5, 40, generator=generator) * 3
    values, indices = torch.log_softmax(teacher / temperature, -1).topk(40, dim=-1)
    ours = topk_kl(student, values, indices, temperature)
    # torch's own KL on the full distributions, mean over the 15 positions, times T²
    reference = (
        F.kl_div(torch.log_softmax(student / temperature, -1), torch.log_softmax(teacher / temperature, -1), log_target=True, reduction="sum")
        / 15
        * temperature**2
    )
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6), (ours, reference)
    (ours_gradient,) = torch.autograd.grad(ours, student)
    (reference_gradient,) = torch.autograd.grad(reference, student)
    assert torch.allclose(ours_gradient, reference_gradient, atol=1e-6)
    assert torch.isfinite(ours_gradient).all()


def test_topk_kl_is_the_kl_of_the_coarsened_distributions_and_at_most_the_full_kl():
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(6, 30, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(6, 30, generator=generator, dtype=torch.float64) * 2
    k = 4
    values, indices = torch.log_softmax(teacher, -1).topk(k, dim=-1)
    ours = topk_kl(student, values, indices).item()
    # Brute force, position by position: k + 1 buckets (the teacher's top k tokens, everything else).
    p_all, q_all = torch.softmax(teacher, -1), torch.softmax(student, -1)
    expected, full = 0.0, 0.0
    for p, q, top in zip(p_all, q_all, indices):
        rest = torch.ones(30, dtype=torch.bool)
        rest[top] = False
        buckets_p = torch.cat([p[top], p[rest].sum()[None]])
        buckets_q = torch.cat([q[top], q[rest].sum()[None]])
        expected += (buckets_p * (buckets_p / buckets_q).log()).sum().item() / 6
        full += (p * (p / q).log()).sum().item() / 6
    assert ours == pytest.approx(expected, rel=1e-5)
    assert 0 < ours < full
    assert topk_kl(teacher, values, indices).item() == pytest.approx(0.0, abs=1e-6)  # the teacher itself


@pytest.mark.parametrize(
    "method,options",
    [
        ("svd", ()),
        ("lowrank-sparse", ("iterations=1",)),
        ("lowrank-quant", ("bits=2", "group_size=32", "iterations=1")),
        ("lowrank-quant", ("bits=2", "group_size=32", "iterations=1", "outliers=0.02")),
    ],
    ids=["svd", "lowrank-sparse", "lowrank-quant", "lowrank-quant-outliers"],
)
def test_healing_moves_the_student_towards_the_teacher_and_trains_only_factors_and_norms(method, options, tmp_path):
    teacher, student, report = compressed(method=method, options=options)
    config = HealConfig(steps=25, batch_size=4, seq_len=16, learning_rate=1e-2, warmup_steps=2, top_k=16)
    train = build_teacher_cache(teacher, random_windows(100), tmp_path / "train", top_k=config.top_k, progress=False)
    held_out = build_teacher_cache(teacher, random_windows(16, seed=99), tmp_path / "held-out", top_k=config.top_k, progress=False)
    before_state = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    before = held_out_kl(student, held_out)

    history = heal(student, train, config, progress=False)

    after = held_out_kl(student, held_out)
    assert history.steps == 25
    if method == "lowrank-quant":  # rank ~1 beside the fixed 2-bit residual: little to move, but it must move the right way
        assert history.mean_loss(last=5) < history.mean_loss(first=5) and after < before, (history.losses, before, after)
    else:
        assert history.mean_loss(last=5) < 0.8 * history.mean_loss(first=5), history.losses
        assert after < 0.8 * before, (before, after)
    trained = set(history.trainable_names)
    assert any(".down.weight" in name for name in trained) and any("norm" in name for name in trained)
    assert not any("embed" in name or "lm_head" in name for name in trained)
    for name, tensor in student.state_dict().items():
        if name in trained:
            continue
        assert torch.equal(tensor, before_state[name]), f"{name} changed but is not a factor or a norm"
    changed = [name for name in trained if not torch.equal(student.state_dict()[name], before_state[name])]
    assert len(changed) == len(trained), set(trained) - set(changed)
    buffers = dict(student.named_buffers())
    if method == "lowrank-quant":
        assert any(name.endswith("residual_codes") for name in buffers)  # kept, bit for bit (checked above)
    if method == "lowrank-sparse":
        assert any(name.endswith("sparse_values") for name in trained)
    if "outliers=0.02" in options:  # the factors train around the fixed codes and outliers (unchanged, checked above)
        assert any(isinstance(module, LowRankQuantSparseLinear) for module in student.modules())
        assert any(name.endswith("sparse_values") for name in before_state) and not any(name.endswith("sparse_values") for name in trained)

    lowrank.save(student, tmp_path / "healed", report=report)
    reloaded = lowrank.load(tmp_path / "healed")
    windows = random_windows(2, seed=5)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=windows).logits, student(input_ids=windows).logits)


def test_an_interrupted_run_resumed_from_its_checkpoint_ends_as_an_uninterrupted_one(tmp_path):
    # GPT-2 has dropout: a resumed run must also restore the random state.
    teacher, student, _ = compressed("gpt2")
    config = HealConfig(steps=6, batch_size=2, seq_len=16, learning_rate=1e-2, warmup_steps=1, top_k=8, checkpoint_every=2)
    cache = build_teacher_cache(teacher, random_windows(12), tmp_path / "teacher", top_k=8, progress=False)

    uninterrupted = copy.deepcopy(student)
    reference = heal(uninterrupted, cache, config, progress=False)

    first = copy.deepcopy(student)
    partial = heal(first, cache, config, work_dir=tmp_path / "work", progress=False, until=3)
    assert partial.steps == 3
    # a checkpoint written before a config field existed resumes with that field at its default
    state = torch.load(tmp_path / "work" / "checkpoint.pt", weights_only=True)
    del state["config"]["hard_weight"]
    torch.save(state, tmp_path / "work" / "checkpoint.pt")
    second = copy.deepcopy(student)  # a new process: the compressed model as it was on disk
    resumed = heal(second, cache, config, work_dir=tmp_path / "work", progress=False)
    assert resumed.resumed_from == 3
    assert resumed.losses == reference.losses
    for (name, expected), actual in zip(uninterrupted.state_dict().items(), second.state_dict().values()):
        assert torch.equal(expected, actual), name
    # the checkpoint records which run it belongs to
    with pytest.raises(LowrankError, match="another healing run"):
        heal(copy.deepcopy(student), cache, HealConfig(**{**config.__dict__, "learning_rate": 1e-3}), work_dir=tmp_path / "work", progress=False)


def test_hard_weight_mixes_the_next_token_cross_entropy_into_the_loss_as_written(tmp_path):
    # Independent reference: one AdamW step on (1 − α)·KL + α·CE written out by hand, against heal's step.
    teacher, student, _ = compressed()
    alpha = 0.3
    config = HealConfig(steps=1, batch_size=4, seq_len=16, learning_rate=1e-2, warmup_steps=0, top_k=16, hard_weight=alpha, max_grad_norm=0)
    cache = build_teacher_cache(teacher, random_windows(4), tmp_path / "train", top_k=16, progress=False)
    manual, plain = copy.deepcopy(student), copy.deepcopy(student)

    history = heal(student, cache, config, progress=False)

    names = prepare_heal_(manual)
    lowrank.train.heal.balance_factors_(manual)
    parameters = [dict(manual.named_parameters())[name] for name in names]
    windows, log_probs, indices = cache.rows(list(range(4)))
    manual.train()
    logits = manual(input_ids=windows, use_cache=False).logits
    kl = topk_kl(logits, log_probs, indices)
    cross_entropy = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), windows[:, 1:].reshape(-1))
    ((1 - alpha) * kl + alpha * cross_entropy).backward()
    torch.optim.AdamW(parameters, lr=1e-2, weight_decay=0.0).step()
    assert history.losses == [pytest.approx(kl.item(), rel=1e-6)]  # the history records the KL alone
    for name, parameter in zip(names, parameters):
        torch.testing.assert_close(dict(student.named_parameters())[name], parameter, rtol=1e-5, atol=1e-7, msg=name)
    # not the pure-distillation step
    heal(plain, cache, HealConfig(**{**config.__dict__, "hard_weight": 0.0}), progress=False)
    assert not torch.allclose(dict(plain.named_parameters())[names[0]], parameters[0])
    with pytest.raises(LowrankError, match="hard_weight must lie in"):
        HealConfig(hard_weight=1.5).validate()


def test_early_stopping_with_hard_weight_measures_the_mixed_objective_on_held_out_windows(tmp_path):
    teacher, student, _ = compressed()
    alpha = 0.4
    config = HealConfig(steps=4, batch_size=4, seq_len=16, learning_rate=1e-2, warmup_steps=1, top_k=VOCAB, hard_weight=alpha, eval_every=2)
    train = build_teacher_cache(teacher, random_windows(16), tmp_path / "train", top_k=VOCAB, progress=False)
    validation = build_teacher_cache(teacher, random_windows(6, seed=99), tmp_path / "validation", top_k=VOCAB, progress=False)
    # independent reference: at k = vocabulary the top-k KL is the full KL (F.kl_div), and the
    # cross-entropy is F.cross_entropy over every next token of the six windows at once
    windows = random_windows(6, seed=99)
    with torch.no_grad():
        student_log_probs = torch.log_softmax(student(input_ids=windows).logits, -1)
        teacher_log_probs = torch.log_softmax(teacher(input_ids=windows).logits, -1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum").item() / (6 * 16)
    cross_entropy = F.nll_loss(student_log_probs[:, :-1].reshape(-1, VOCAB), windows[:, 1:].reshape(-1)).item()
    expected = (1 - alpha) * kl + alpha * cross_entropy
    assert held_out_loss(student, validation, batch_size=4, hard_weight=alpha) == pytest.approx(expected, rel=1e-4)  # two batches, uneven
    assert held_out_loss(student, validation) == pytest.approx(held_out_kl(student, validation)) == pytest.approx(kl, rel=1e-4)

    history = heal(student, train, config, progress=False, validation=validation)

    assert history.validation[0][1] == pytest.approx(expected, rel=1e-4)  # what early stopping compares is the mixed objective
    assert held_out_loss(student, validation, hard_weight=alpha) == pytest.approx(min(loss for _, loss in history.validation), rel=1e-5)


def test_early_stopping_ends_with_the_parameters_of_the_lowest_held_out_kl(tmp_path):
    # A learning rate far too high: training drives the held-out KL up, and early stopping must
    # give back the best measured state, which an independent measurement afterwards confirms.
    teacher, student, _ = compressed()
    config = HealConfig(steps=8, batch_size=4, seq_len=16, learning_rate=0.3, warmup_steps=1, top_k=16, eval_every=2)
    train = build_teacher_cache(teacher, random_windows(32), tmp_path / "train", top_k=16, progress=False)
    validation = build_teacher_cache(teacher, random_windows(8, seed=99), tmp_path / "validation", top_k=16, progress=False)
    before = held_out_kl(student, validation)
    plain = copy.deepcopy(student)
    heal(plain, train, HealConfig(**{**config.__dict__, "eval_every": 0}), progress=False)

    history = heal(student, train, config, progress=False, validation=validation)

    steps, kls = zip(*history.validation)
    assert steps == (0, 2, 4, 6, 8)
    assert kls[0] == pytest.approx(before, rel=1e-4)  # step 0 is the compressed model itself (balancing only rescales)
    assert history.best_step == steps[kls.index(min(kls))]
    assert held_out_kl(student, validation) == pytest.approx(min(kls), rel=1e-5)
    assert held_out_kl(student, validation) <= before * (1 + 1e-4) < held_out_kl(plain, validation), "early stopping must matter here"
    with pytest.raises(LowrankError, match="validation cache and eval_every"):
        heal(copy.deepcopy(student), train, config, progress=False)


def test_early_stopping_resumes_with_its_best_state(tmp_path):
    teacher, student, _ = compressed()
    config = HealConfig(steps=6, batch_size=2, seq_len=16, learning_rate=0.3, warmup_steps=1, top_k=8, checkpoint_every=2, eval_every=2)
    train = build_teacher_cache(teacher, random_windows(12), tmp_path / "train", top_k=8, progress=False)
    validation = build_teacher_cache(teacher, random_windows(4, seed=7), tmp_path / "validation", top_k=8, progress=False)
    uninterrupted = copy.deepcopy(student)
    reference = heal(uninterrupted, train, config, progress=False, validation=validation)
    heal(copy.deepcopy(student), train, config, work_dir=tmp_path / "work", progress=False, until=3, validation=validation)
    resumed_student = copy.deepcopy(student)
    resumed = heal(resumed_student, train, config, work_dir=tmp_path / "work", progress=False, validation=validation)
    assert resumed.validation == reference.validation and resumed.best_step == reference.best_step
    for (name, expected), actual in zip(uninterrupted.state_dict().items(), resumed_student.state_dict().values()):
        assert torch.equal(expected, actual), name
    with pytest.raises(LowrankError, match="another model or other windows"):  # another validation set is another run
        heal(copy.deepcopy(student), train, config, work_dir=tmp_path / "work", progress=False, validation=train)


def test_split_tokens_holds_out_a_contiguous_tail():
    ids = torch.arange(1000)
    train, tail = split_tokens(ids, 0.1)
    assert torch.equal(torch.cat([train, tail]), ids) and tail.numel() == 100
    with pytest.raises(LowrankError, match="held-out fraction"):
        split_tokens(ids, 1.0)


def test_teacher_cache_is_reused_when_it_matches_and_rebuilt_when_not(tmp_path):
    teacher, student, _ = compressed()
    windows = random_windows(4)
    cache = build_teacher_cache(teacher, windows, tmp_path / "cache", top_k=8, progress=False)
    assert cache.rows([0])[1].shape == (1, 16, 8)
    assert torch.equal(cache.rows([1, 2])[0], windows[1:3])
    built = (tmp_path / "cache" / "meta.json").stat().st_mtime_ns
    assert build_teacher_cache(teacher, windows, tmp_path / "cache", top_k=8, progress=False).meta == cache.meta
    assert (tmp_path / "cache" / "meta.json").stat().st_mtime_ns == built
    assert build_teacher_cache(teacher, windows, tmp_path / "cache", top_k=4, progress=False).top_k == 4
    with pytest.raises(LowrankError, match="16-token windows"):
        heal(student, cache, HealConfig(steps=1, seq_len=32), progress=False)


def test_a_dense_model_has_nothing_to_heal():
    with pytest.raises(LowrankError, match="compress it first"):
        prepare_heal_(tiny_model("llama"))


@pytest.mark.parametrize(
    "make_layer",
    [
        lambda: LowRankLinear(12, 8, rank=3),
        lambda: LowRankQuantSparseLinear.from_factors(
            LowRankQuantSparseFactors(
                torch.randn(8, 3),
                torch.randn(3, 64),
                quantize_groups(torch.randn(8, 64), 4, 32),
                torch.tensor([1, 5]),
                torch.tensor([3, 0]),
                torch.randn(2),
            ),
            bias=None,
            dtype=torch.float32,
        ),
    ],
    ids=["LowRankLinear", "LowRankQuantSparseLinear"],
)
def test_balancing_keeps_every_product_and_equalizes_each_components_norms(make_layer):
    from lowrank.train.heal import balance_factors_

    torch.manual_seed(0)
    layer = make_layer()
    with torch.no_grad():  # as a whitened factorization leaves them: tiny `down`, huge `up`
        layer.down.weight.mul_(torch.tensor([1e-3, 1e-2, 1.0])[:, None])
        layer.up.weight.mul_(torch.tensor([1e3, 10.0, 1.0]))
    product = layer.to_dense().detach().clone()
    terms = [torch.outer(layer.up.weight[:, i], layer.down.weight[i]).detach().clone() for i in range(3)]
    assert balance_factors_(layer) == 1
    assert torch.allclose(layer.to_dense(), product, rtol=1e-5, atol=1e-6)
    assert torch.allclose(layer.up.weight.norm(dim=0), layer.down.weight.norm(dim=1), rtol=1e-5)
    for i, term in enumerate(terms):  # each rank-1 term stays in its place (nested ranks for --elastic)
        assert torch.allclose(torch.outer(layer.up.weight[:, i], layer.down.weight[i]), term, rtol=1e-5, atol=1e-6)


def test_healing_trains_a_modegpt_models_shrunk_layers(tmp_path):
    """MoDeGPT type III leaves dense layers of smaller shapes (ResizedLinear MLPs, HeadPaddedLinear v_proj,
    HeadSlicedLinear o_proj) beside factored ones: healing must train all of them and keep their shapes."""
    from lowrank.methods.modegpt import ModegptConfig, compress_modegpt_
    from lowrank.nn.head_resized_linear import HeadPaddedLinear, HeadSlicedLinear
    from lowrank.nn.resized_linear import ResizedLinear

    teacher = tiny_model("llama")
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(30)
    batches = [{"input_ids": ids, "labels": ids} for ids in random_windows(12, 32, seed=3).split(4)]
    stats = lowrank.collect_statistics(teacher, batches, lowrank.find_targets(teacher), gradients=True, progress=False)
    student = copy.deepcopy(teacher)
    options = ModegptConfig(attention="value", factored="fisher-whiten", fallback=False)  # every unit shrinks
    plan = lowrank.allocate(student, 0.4, method="modegpt", stats=stats, strategy="uniform", strategy_config=options)
    report = compress_modegpt_(student, plan, stats, options, progress=False)
    shrunk = {name: module for name, module in student.named_modules() if isinstance(module, (ResizedLinear, HeadPaddedLinear, HeadSlicedLinear))}
    assert {type(module) for module in shrunk.values()} == {ResizedLinear, HeadPaddedLinear, HeadSlicedLinear}
    shapes = {name: tuple(parameter.shape) for name, parameter in student.named_parameters()}
    config = HealConfig(steps=25, batch_size=4, seq_len=16, learning_rate=1e-3, warmup_steps=2, top_k=16)  # its dense layers' entries are small: 1e-2 overshoots
    train = build_teacher_cache(teacher, random_windows(100), tmp_path / "train", top_k=config.top_k, progress=False)
    held_out = build_teacher_cache(teacher, random_windows(16, seed=99), tmp_path / "held-out", top_k=config.top_k, progress=False)
    before_state = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    before = held_out_kl(student, held_out)

    history = heal(student, train, config, progress=False)

    assert held_out_kl(student, held_out) < 0.8 * before
    trained = set(history.trainable_names)
    for name, module in shrunk.items():
        for parameter_name, _ in module.named_parameters():
            full = f"{name}.{parameter_name}"
            assert full in trained, f"{full} ({type(module).__name__}) does not train"
            assert not torch.equal(student.state_dict()[full], before_state[full]), f"{full} did not move"
    assert {name: tuple(parameter.shape) for name, parameter in student.named_parameters()} == shapes
    lowrank.save(student, tmp_path / "healed", report=report)
    windows = random_windows(2, seed=5)
    with torch.no_grad():
        assert torch.equal(lowrank.load(tmp_path / "healed")(input_ids=windows).logits, student(input_ids=windows).logits)
