"""Mixture-of-experts blocks with one linear layer per expert projection.

Transformers stores the experts of a block fused: one 3-D parameter per projection, one slice per
expert (``experts.gate_up_proj`` of shape experts × out × in, or experts × in × out when
``is_transposed``), with no ``nn.Linear`` in sight. :func:`unfuse_experts` swaps such a module for
:class:`UnfusedExperts`, which computes exactly the same function but holds every slice as an
``nn.Linear`` (``experts.gate_up_proj[e]``, ``experts.down_proj[e]``). Everything downstream then
works unchanged: :func:`~lowrank.nn.find_targets` sees per-expert linears, calibration hooks on an
expert see only the tokens routed to it, every expert gets its own rank, and ``compress_`` replaces
each one with a factored module.

Fused experts modules are found by structure, not by model name: a module carrying the flags that
transformers' ``@use_experts_implementation`` sets (``has_gate``, ``has_bias``, ``is_transposed``)
whose own parameters are the 3-D projections (``gate_up_proj`` or ``up_proj``, and ``down_proj``)
sharing their leading experts dimension, plus their ``*_bias`` when ``has_bias``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import LowrankError

log = logging.getLogger(__name__)

# Plain attributes that belong to nn.Module itself, never copied from the fused module.
_MODULE_STATE = {"training"}


def _projection_names(module: nn.Module) -> tuple[str, str]:
    """(input projection, output projection) parameter names of a fused experts module."""
    return ("gate_up_proj" if module.has_gate else "up_proj"), "down_proj"


def is_fused_experts(module: nn.Module) -> bool:
    """True for a transformers fused experts module that :class:`UnfusedExperts` reproduces exactly."""
    if isinstance(module, UnfusedExperts) or not all(hasattr(module, flag) for flag in ("has_gate", "has_bias", "is_transposed", "_apply_gate")):
        return False
    projections = _projection_names(module)
    expected = set(projections) | ({f"{name}_bias" for name in projections} if module.has_bias else set())
    parameters = dict(module.named_parameters(recurse=False))
    if set(parameters) != expected or any(True for _ in module.named_buffers(recurse=False)):
        return False
    weights = [parameters[name] for name in projections]
    if any(weight.dim() != 3 for weight in weights) or len({weight.shape[0] for weight in weights}) != 1:
        return False
    return not module.has_bias or all(parameters[f"{name}_bias"].dim() == 2 for name in projections)


def _looks_fused(module: nn.Module) -> bool:
    """Own 3-D parameters sharing a leading dimension: experts stored fused, supported or not."""
    shapes = [parameter.shape for parameter in module.parameters(recurse=False) if parameter.dim() == 3]
    return len(shapes) >= 2 and len({shape[0] for shape in shapes}) == 1


def find_fused_experts(model: nn.Module) -> list[str]:
    """Names of the fused experts modules in ``model`` that :func:`unfuse_experts` can unfuse."""
    return [name for name, module in model.named_modules() if is_fused_experts(module)]


def _expert_linears(weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> nn.ModuleList:
    """One ``nn.Linear`` per expert slice, with copied (out, in) weights on the fused tensor's device and dtype."""
    linears = nn.ModuleList()
    for expert in range(weight.shape[0]):
        matrix = weight[expert].T if transposed else weight[expert]
        out_features, in_features = matrix.shape
        linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        # Copies, not views: a view would keep the whole fused tensor alive and makes safetensors refuse shared storage.
        linear.weight = nn.Parameter(matrix.detach().clone().contiguous(), requires_grad=weight.requires_grad)
        if bias is not None:
            linear.bias = nn.Parameter(bias[expert].detach().clone(), requires_grad=bias.requires_grad)
        linears.append(linear)
    return linears


class UnfusedExperts(nn.Module):
    """The experts of one mixture-of-experts block, every projection of every expert an ``nn.Linear``.

    Built by :meth:`from_fused` from a transformers fused experts module; same call, same result:
    ``forward(hidden_states (tokens, hidden), top_k_index (tokens, k), top_k_weights (tokens, k))``
    runs each expert that received tokens on those tokens only, applies the model's own gate (or
    activation when the experts have no gate), the optional post-expert norm, weights the outputs by
    the routing weights and sums them per token. Routing indices equal to the number of experts
    (expert-parallel placeholders) are skipped, as transformers does.

    The fused module's plain attributes (``num_experts``, ``config``, ``is_transposed``, swiglu
    limits, ...) are kept, so the model's ``_apply_gate`` finds what it reads; ``is_transposed`` and
    ``has_bias`` describe the fused layout the weights came from, which :func:`fused_state_dict`
    writes back. Children of the fused module (``act_fn``, ``post_expert_norm``) move over unchanged.

    Attributes:
        gate_up_proj / up_proj: ``ModuleList`` of the experts' input projections (``gate_up_proj``
            when the experts are gated, its output holding gate and up as the model lays them out).
        down_proj: ``ModuleList`` of the experts' output projections.
        fused_class: name of the transformers class this module replaced.
    """

    def __init__(self, attributes: dict, children: dict[str, nn.Module], projections: dict[str, nn.ModuleList], gate, fused_class: str):
        super().__init__()
        for key, value in attributes.items():
            setattr(self, key, value)
        for key, child in {**children, **projections}.items():
            self.add_module(key, child)
        self.input_name, self.output_name = list(projections)
        self.fused_class = fused_class
        # The model's own gate function (SwiGLU, GPT-OSS's clamped interleaved GLU, ...), called with
        # this module as ``self``: it reads only the copied attributes and children.
        self._gate = gate

    @classmethod
    def from_fused(cls, fused: nn.Module) -> UnfusedExperts:
        """The unfused equivalent of a fused experts module: weights copied, children (``act_fn``, ...) shared."""
        if not is_fused_experts(fused):
            raise LowrankError(f"{type(fused).__name__} is not a fused experts module lowrank can unfuse; leave it dense")
        parameters = dict(fused.named_parameters(recurse=False))
        projections = {
            name: _expert_linears(parameters[name], parameters.get(f"{name}_bias") if fused.has_bias else None, fused.is_transposed)
            for name in _projection_names(fused)
        }
        attributes = {key: value for key, value in vars(fused).items() if not key.startswith("_") and key not in _MODULE_STATE}
        attributes["num_experts"] = parameters["down_proj"].shape[0]
        children = dict(fused.named_children())
        return cls(attributes, children, projections, type(fused)._apply_gate, type(fused).__name__).train(fused.training)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)  # (tokens, hidden)
        with torch.no_grad():
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)  # (experts + 1, k, tokens)
            hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        inputs, outputs = getattr(self, self.input_name), getattr(self, self.output_name)
        for expert in hit:
            if expert == self.num_experts:
                continue
            top_k_position, token_index = torch.where(expert_mask[expert])
            hidden = inputs[expert](hidden_states[token_index])
            hidden = self._gate(self, hidden) if self.has_gate else self.act_fn(hidden)
            hidden = outputs[expert](hidden)
            if getattr(self, "has_post_expert_norm", False):
                hidden = self.post_expert_norm(hidden)
            hidden = hidden * top_k_weights[token_index, top_k_position, None]
            final.index_add_(0, token_index, hidden.to(final.dtype))
        return final

    def projection_names(self) -> list[str]:
        """Names (relative to this module) of every per-expert projection, e.g. ``gate_up_proj.3``."""
        return [f"{name}.{expert}" for name in (self.input_name, self.output_name) for expert in range(self.num_experts)]

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, fused_class={self.fused_class}"


def unfuse_experts(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace fused experts modules by :class:`UnfusedExperts`, in place; returns the names replaced.

    With ``names=None`` every fused experts module transformers' experts interface describes is
    unfused (a model without experts, or one already unfused, is left unchanged). Modules that store
    experts as 3-D parameters in some other way stay fused (logged): their forward is not one this
    module can reproduce, so they are simply not compressed.

    Args:
        model: any module tree, typically a Hugging Face model.
        names: exactly these modules (as recorded in ``lowrank_config.json``); each must be a fused
            experts module.

    Raises:
        LowrankError: if a given name is not a fused experts module.

    Example:
        >>> unfuse_experts(model)  # doctest: +SKIP
        ['model.layers.0.mlp.experts', 'model.layers.1.mlp.experts']
    """
    if names is None:
        names = find_fused_experts(model)
        unsupported = [name for name, module in model.named_modules() if _looks_fused(module) and name not in names]
        if unsupported:
            log.info(
                "experts stored as 3-D parameters in %s (%s) are not unfused; they stay dense",
                unsupported[0],
                type(model.get_submodule(unsupported[0])).__name__,
            )
    for name in names:
        try:
            fused = model.get_submodule(name)
        except AttributeError:
            fused = None
        if fused is None or not is_fused_experts(fused):
            raise LowrankError(f"{name} is not a fused experts module of this model; the saved directory belongs to another architecture")
        model.set_submodule(name, UnfusedExperts.from_fused(fused))
    return list(names)


def find_unfused_experts(model: nn.Module) -> list[str]:
    """Names of the :class:`UnfusedExperts` modules in ``model``."""
    return [name for name, module in model.named_modules() if isinstance(module, UnfusedExperts)]


def expert_projection_names(model: nn.Module) -> list[str]:
    """Full names of every per-expert projection in the unfused experts of ``model``."""
    return [f"{name}.{projection}" for name in find_unfused_experts(model) for projection in model.get_submodule(name).projection_names()]


def fused_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every :class:`UnfusedExperts` written back in its fused layout.

    What transformers expects of a dense checkpoint (its ``save_pretrained`` then converts the fused
    keys to the hub format, and ``from_pretrained`` loads them).

    Raises:
        LowrankError: if an expert projection is no longer an ``nn.Linear`` (a compressed model is
            saved with its per-expert keys, see :func:`lowrank.save`).
    """
    state = model.state_dict()
    for name in find_unfused_experts(model):
        experts = model.get_submodule(name)
        for projection in (experts.input_name, experts.output_name):
            linears = list(getattr(experts, projection))
            if not all(type(linear) is nn.Linear for linear in linears):
                raise LowrankError(
                    f"{name}.{projection} holds compressed experts, which have no fused layout; pass the model's report to lowrank.save"
                )
            weights = torch.stack([linear.weight.detach() for linear in linears])
            state[f"{name}.{projection}"] = weights.transpose(1, 2).contiguous() if experts.is_transposed else weights
            if experts.has_bias:
                state[f"{name}.{projection}_bias"] = torch.stack([linear.bias.detach() for linear in linears])
            for expert in range(len(linears)):
                for suffix in ("weight", "bias"):
                    state.pop(f"{name}.{projection}.{expert}.{suffix}", None)
    return state
