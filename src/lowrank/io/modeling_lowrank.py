"""Modeling code that lowrank writes beside a compressed model, so that transformers loads it alone.

``AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)`` (``AutoModel`` for an
encoder) builds the transformers class named by ``BASE_ARCHITECTURE`` below (``AutoModel`` on a
decoder builds ``BASE_MODEL``, the architecture without its head), then, as listed under
``lowrank`` in ``config.json``, gives every mixture-of-experts block in ``unfused_experts`` one
linear layer per expert projection and replaces every layer in ``layers`` by an empty module of its
saved structure. Their parameter and buffer names are those of the saved weights, so transformers'
own loading fills them. Needs only torch and transformers; each module computes what lowrank's
module of the same name computes, from the same stored tensors:

- ``LowRankLinear``: y = up(down(x)), ``down`` (rank × in) and ``up`` (out × rank) linear layers.
- ``LowRankPlusSparseLinear``: y = up(down(x)) + S·x, S in CSR form: ``sparse_values``,
  ``sparse_col_indices`` (int16, int32 past 32768 inputs), ``sparse_crow_indices`` (int32).
- ``DictionaryLinear``: y = Codes·atoms(x) + bias, ``nonzeros`` codes per output row
  (``code_values``, ``code_indices``), ``atoms`` a linear layer.
- ``LowRankQuantLinear``: y = up(down(x)) + Q·x, Q quantized in groups of input columns: codes and
  zero points packed ``bits`` bits each (``residual_codes``, ``residual_zeros``), float16
  ``residual_scales``. On CPU, Q·x runs in torch's int4 weight-only kernel (bfloat16 activations,
  float32 accumulation), as lowrank does; elsewhere Q is dequantized at each call.
- ``LowRankQuantSparseLinear``: y = up(down(x)) + Q·x + S·x, ``LowRankQuantLinear`` plus full-precision
  outliers S stored as ``LowRankPlusSparseLinear`` stores its sparse part.
- ``QuantizedCorrectionLinear``: y = up(down(x)) + Q·x + bias (``lowrank compensate --factor-bits``),
  Q stored and run as in ``LowRankQuantLinear``; both factors group-quantized too, one rank component
  per row (``down_codes``/``down_zeros`` packed ``factor_bits`` bits, float16 ``down_scales``, rank ×
  groups of the input; ``up`` the same, stored transposed, groups of the output), dequantized into
  the activations' dtype at the first call.
- ``ResizedLinear``: a plain ``nn.Linear`` of the saved shape, which differs from the
  architecture's (``modegpt`` keeps k of an MLP's neurons: gate/up (k × hidden), down (hidden × k)).
- ``HeadPaddedLinear``: v_proj with k of ``head_dim`` dimensions per head (``modegpt``
  ``attention="value"``): y = W·x + b, ``kept_weight`` W (heads·k × in), each head's k outputs
  followed by head_dim − k zeros, so the attention still sees heads of ``head_dim``.
- ``HeadSlicedLinear``: o_proj reading the first k dimensions of each head: y = W·[x_h[:k] per head] + b,
  ``kept_weight`` W (out × heads·k).
- ``HeadScatteredLinear``: q_proj/k_proj with k dimensions per head at any positions (``modegpt``
  ``attention="query_key"`` keeps rotary pairs): ``HeadPaddedLinear`` whose outputs go where the boolean
  ``kept_mask`` buffer (heads × head_dim) is set, zeros elsewhere.
- ``UnfusedExperts``: a transformers experts module (3-D ``gate_up_proj``/``up_proj`` and
  ``down_proj``) with an ``nn.ModuleList`` of per-expert linear layers for each projection, running
  the model's own gate function.
"""

import torch
import torch.nn.functional as F
import transformers
from torch import nn

BASE_ARCHITECTURE = "LlamaForCausalLM"  # written by lowrank: the transformers class the saved model extends
BASE_MODEL = "LlamaModel"  # written by lowrank: the class AutoModel builds for this config
CONFIG_KEY = "lowrank"  # config.json: {"unfused_experts": [name], "layers": {name: {"structure", "in_features", "out_features", "bias", ...}}}


def index_dtype(size):
    """The dtype lowrank stores indices below ``size`` in: int16 up to 32768, else int32."""
    return torch.int16 if size <= 2**15 else torch.int32


def sparse_rows_matmul(x, col_indices, row_starts, values):
    """x·Sᵀ for x (tokens, in) and a sparse S (out, in) whose row i holds the entries from ``row_starts[i]``."""
    y = F.embedding_bag(col_indices.int(), x.T.contiguous(), row_starts.int(), mode="sum", per_sample_weights=values.to(x.dtype))
    return y.T  # (tokens, out)


class Factored(nn.Module):
    weight = None  # no dense weight: model code that reads layer.weight (T5) then skips that step


class LowRankLinear(Factored):
    def __init__(self, in_features, out_features, bias, rank):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x):
        return self.up(self.down(x))


class SparsePart:
    """S in CSR form (``sparse_values``, ``sparse_col_indices``, ``sparse_crow_indices``), for the structures that hold one."""

    def register_sparse(self, num_nonzero):
        self.sparse_values = nn.Parameter(torch.zeros(num_nonzero))
        self.register_buffer("sparse_col_indices", torch.zeros(num_nonzero, dtype=index_dtype(self.in_features)))
        self.register_buffer("sparse_crow_indices", torch.zeros(self.out_features + 1, dtype=torch.int32))

    def sparse_product(self, x):
        flat = x.reshape(-1, self.in_features)
        sparse = sparse_rows_matmul(flat, self.sparse_col_indices, self.sparse_crow_indices[:-1], self.sparse_values)
        return sparse.reshape(*x.shape[:-1], self.out_features)


class LowRankPlusSparseLinear(SparsePart, Factored):
    def __init__(self, in_features, out_features, bias, rank, num_nonzero):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)
        self.register_sparse(num_nonzero)

    def forward(self, x):
        return self.up(self.down(x)) + self.sparse_product(x)


class DictionaryLinear(Factored):
    def __init__(self, in_features, out_features, bias, num_atoms, nonzeros):
        super().__init__()
        self.out_features, self.num_atoms, self.nonzeros = out_features, num_atoms, nonzeros
        self.atoms = nn.Linear(in_features, num_atoms, bias=False)
        self.code_values = nn.Parameter(torch.zeros(out_features, nonzeros))
        self.register_buffer("code_indices", torch.zeros(out_features, nonzeros, dtype=index_dtype(num_atoms)))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        mixed = self.atoms(x).reshape(-1, self.num_atoms)  # (tokens, atoms)
        row_starts = torch.arange(self.out_features, device=x.device) * self.nonzeros
        y = sparse_rows_matmul(mixed, self.code_indices.reshape(-1), row_starts, self.code_values.reshape(-1))
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


def unpack_bits(packed, bits, count):
    """The first ``count`` codes packed ``bits`` bits each, 8 codes in ``bits`` bytes (little-endian), as int64."""
    words = (packed.reshape(-1, bits).long() << (torch.arange(bits, device=packed.device) * 8)).sum(dim=1)
    codes = (words[:, None] >> (torch.arange(8, device=packed.device) * bits)) & (2**bits - 1)
    return codes.reshape(-1)[:count]


def int4_layout(codes, scales, zeros, bits, group_size):
    """(packed codes, scales and zeros, kernel group size, input padding, planes) for ``_weight_int4pack_mm_for_cpu``.

    The kernel computes x·Wᵀ with W = (c − 8)·scale + zero per group of a 4-bit code c. Codes of up
    to 4 bits are shifted to centre on 8; 5–8-bit codes are split into two 4-bit planes
    c = 16·hi + lo laid side by side along the input (the input is then repeated, [x, x]).
    """
    kernel_group = next(size for size in (256, 128, 64, 32) if group_size % size == 0)
    out_features, in_features = codes.shape
    in_padding = scales.shape[1] * group_size - in_features
    out_padding = -out_features % 16  # the kernel tiles output rows by 16; padded rows get scale 0
    codes = F.pad(codes.int(), (0, in_padding, 0, out_padding))
    scale, zero = F.pad(scales.float(), (0, 0, 0, out_padding)), F.pad(zeros.float(), (0, 0, 0, out_padding))
    if bits <= 4:
        shift = 8 - 2 ** (bits - 1)
        planes = [(codes + shift, scale, (8 - shift - zero) * scale)]
    else:
        shift = (136 - 2 ** (bits - 1)) // 16
        planes = [((codes >> 4) + shift, 16 * scale, (136 - 16 * shift - zero) * scale), (codes & 15, scale, torch.zeros_like(scale))]
    repeat = group_size // kernel_group
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.cat([p[0] for p in planes], dim=1).contiguous(), 2)
    scale_rows = torch.cat([p[1] for p in planes], dim=1).repeat_interleave(repeat, dim=1)
    zero_rows = torch.cat([p[2] for p in planes], dim=1).repeat_interleave(repeat, dim=1)
    scales_and_zeros = torch.stack([scale_rows.T, zero_rows.T], dim=-1).to(torch.bfloat16).contiguous()
    return packed, scales_and_zeros, kernel_group, in_padding, len(planes)


class Int4Product(torch.autograd.Function):
    """x·Qᵀ in the int4 kernel; the backward pass (which the kernel lacks) multiplies by the dequantized Q."""

    @staticmethod
    def forward(ctx, x, layer, layout):
        ctx.layer = layer
        packed, scales_and_zeros, group_size, in_padding, planes = layout
        flat = F.pad(x.to(torch.bfloat16), (0, in_padding))
        flat = torch.cat([flat] * planes, dim=1).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, group_size, scales_and_zeros)
        return y[:, : layer.out_features].to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.residual(grad.dtype), None, None


def dequantize(codes, scales, zeros, group_size, dtype):
    """(code − zero)·scale in ``dtype`` for (rows, width) codes and (rows, groups) scales and zero points."""
    width = codes.shape[1]
    step = scales.to(dtype).repeat_interleave(group_size, dim=1)[:, :width]
    offset = zeros.to(dtype).repeat_interleave(group_size, dim=1)[:, :width]
    return (codes.to(dtype) - offset) * step


class QuantizedResidual(Factored):
    """Q of the structures that hold one (``residual_codes``, ``residual_zeros``, ``residual_scales``), run in the int4 kernel on CPU."""

    def register_residual(self):
        groups = -(-self.in_features // self.group_size)
        self.register_buffer("residual_codes", torch.zeros((self.out_features * self.in_features + 7) // 8 * self.bits, dtype=torch.uint8))
        self.register_buffer("residual_zeros", torch.zeros((self.out_features * groups + 7) // 8 * self.bits, dtype=torch.uint8))
        self.register_buffer("residual_scales", torch.zeros(self.out_features, groups, dtype=torch.float16))
        self._layout, self._layout_key = None, None

    def stored(self):
        """(codes (out, in), zero points (out, groups)) unpacked."""
        codes = unpack_bits(self.residual_codes, self.bits, self.out_features * self.in_features).view(self.out_features, self.in_features)
        zeros = unpack_bits(self.residual_zeros, self.bits, self.residual_scales.numel()).view(self.residual_scales.shape)
        return codes, zeros

    def residual(self, dtype):
        """Q = (code − zero)·scale, (out, in)."""
        codes, zeros = self.stored()
        return dequantize(codes, self.residual_scales, zeros, self.group_size, dtype)

    def int4(self):
        """The kernel layout, built at the first call on CPU and again only when the stored tensors change."""
        if self.residual_codes.device.type != "cpu" or self.group_size % 32 or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return None
        key = tuple((t.data_ptr(), t._version) for t in (self.residual_codes, self.residual_zeros, self.residual_scales))
        if key != self._layout_key:
            with torch.no_grad():
                codes, zeros = self.stored()
                self._layout = int4_layout(codes, self.residual_scales, zeros, self.bits, self.group_size)
            self._layout_key = key
        return self._layout

    def residual_product(self, x):
        """Q·x: the int4 kernel where it applies, else the dequantized Q."""
        layout = self.int4()
        if layout is None:
            return F.linear(x, self.residual(x.dtype))
        return Int4Product.apply(x.reshape(-1, self.in_features), self, layout).view(*x.shape[:-1], self.out_features)


class LowRankQuantLinear(QuantizedResidual):
    def __init__(self, in_features, out_features, bias, rank, bits, group_size):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)
        self.register_residual()

    def forward(self, x):
        return self.up(self.down(x)) + self.residual_product(x)


class LowRankQuantSparseLinear(SparsePart, LowRankQuantLinear):
    def __init__(self, in_features, out_features, bias, rank, bits, group_size, num_nonzero):
        super().__init__(in_features, out_features, bias, rank, bits, group_size)
        self.register_sparse(num_nonzero)

    def forward(self, x):
        return super().forward(x) + self.sparse_product(x)


class QuantizedCorrectionLinear(QuantizedResidual):
    def __init__(self, in_features, out_features, bias, rank, bits, group_size, factor_bits, factor_group_size):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.rank, self.factor_bits, self.factor_group_size = rank, factor_bits, factor_group_size
        self.register_residual()
        for part, width in (("down", in_features), ("up", out_features)):
            groups = -(-width // factor_group_size)
            self.register_buffer(f"{part}_codes", torch.zeros((rank * width + 7) // 8 * factor_bits, dtype=torch.uint8))
            self.register_buffer(f"{part}_zeros", torch.zeros((rank * groups + 7) // 8 * factor_bits, dtype=torch.uint8))
            self.register_buffer(f"{part}_scales", torch.zeros(rank, groups, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._factors, self._factors_key = None, None

    def factor(self, part, width, dtype):
        """One factor's (rank, width) rows dequantized in float32 (float64 for float64), then rounded once to ``dtype``."""
        scales = getattr(self, f"{part}_scales")
        codes = unpack_bits(getattr(self, f"{part}_codes"), self.factor_bits, self.rank * width).view(self.rank, width)
        zeros = unpack_bits(getattr(self, f"{part}_zeros"), self.factor_bits, scales.numel()).view(scales.shape)
        exact = torch.float64 if dtype == torch.float64 else torch.float32
        return dequantize(codes, scales, zeros, self.factor_group_size, exact).to(dtype)

    def factors(self, dtype):
        """(up (out, rank), down (rank, in)) in ``dtype``, built at the first call and again only when the codes or dtype change."""
        parts = [getattr(self, f"{part}_{kind}") for part in ("down", "up") for kind in ("codes", "zeros", "scales")]
        key = (dtype, *((t.data_ptr(), t._version) for t in parts))
        if key != self._factors_key:
            with torch.no_grad():
                self._factors = (
                    self.factor("up", self.out_features, dtype).T.contiguous(),
                    self.factor("down", self.in_features, dtype).contiguous(),
                )
            self._factors_key = key
        return self._factors

    def forward(self, x):
        up, down = self.factors(x.dtype)
        return F.linear(F.linear(x, down), up, self.bias) + self.residual_product(x)


class ResizedLinear(nn.Linear):
    def __init__(self, in_features, out_features, bias):
        super().__init__(in_features, out_features, bias=bias)


class HeadPaddedLinear(Factored):
    def __init__(self, in_features, out_features, bias, heads, head_dim, kept):
        super().__init__()
        self.in_features, self.out_features, self.heads, self.head_dim, self.kept = in_features, out_features, heads, head_dim, kept
        rows, columns = self.compact_shape()
        self.kept_weight = nn.Parameter(torch.zeros(rows, columns))
        self.bias = nn.Parameter(torch.zeros(rows)) if bias else None

    def compact_shape(self):
        return self.heads * self.kept, self.in_features

    def forward(self, x):
        y = F.linear(x, self.kept_weight, self.bias).unflatten(-1, (self.heads, self.kept))
        return F.pad(y, (0, self.head_dim - self.kept)).flatten(-2)


class HeadSlicedLinear(HeadPaddedLinear):
    def compact_shape(self):
        return self.out_features, self.heads * self.kept

    def forward(self, x):
        kept = x.unflatten(-1, (self.heads, self.head_dim))[..., : self.kept].flatten(-2)
        return F.linear(kept, self.kept_weight, self.bias)


class HeadScatteredLinear(HeadPaddedLinear):
    def __init__(self, in_features, out_features, bias, heads, head_dim, kept):
        super().__init__(in_features, out_features, bias, heads, head_dim, kept)
        self.register_buffer("kept_mask", torch.zeros(heads, head_dim, dtype=torch.bool))  # filled from the saved weights

    def forward(self, x):
        y = F.linear(x, self.kept_weight, self.bias)  # (..., heads·k), head by head, ascending positions
        out = y.new_zeros(*y.shape[:-1], self.heads * self.head_dim)
        out[..., self.kept_mask.flatten()] = y
        return out


class UnfusedExperts(nn.Module):
    """The experts of one mixture-of-experts block, one ``nn.Linear`` per expert and projection."""

    def __init__(self, fused):
        super().__init__()
        for key, value in vars(fused).items():  # num_experts, config, has_gate, swiglu limits: what the gate reads
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        for key, child in fused.named_children():  # act_fn, post_expert_norm
            self.add_module(key, child)
        parameters = dict(fused.named_parameters(recurse=False))
        self.input_name = "gate_up_proj" if fused.has_gate else "up_proj"
        self.num_experts = parameters["down_proj"].shape[0]
        for name in (self.input_name, "down_proj"):
            _, rows, columns = parameters[name].shape
            in_features, out_features = (rows, columns) if fused.is_transposed else (columns, rows)
            self.add_module(name, nn.ModuleList(nn.Linear(in_features, out_features, bias=fused.has_bias) for _ in range(self.num_experts)))
        self._gate = type(fused)._apply_gate  # the model's own gate (SwiGLU, clamped GLU, ...), called with this module as self

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final = torch.zeros_like(hidden_states)  # (tokens, hidden)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)  # (experts + 1, k, tokens)
            hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        for expert in hit:
            if expert == self.num_experts:  # expert-parallel placeholder
                continue
            top_k_position, token_index = torch.where(expert_mask[expert])
            hidden = getattr(self, self.input_name)[expert](hidden_states[token_index])
            hidden = self._gate(self, hidden) if self.has_gate else self.act_fn(hidden)
            hidden = self.down_proj[expert](hidden)
            if getattr(self, "has_post_expert_norm", False):
                hidden = self.post_expert_norm(hidden)
            final.index_add_(0, token_index, (hidden * top_k_weights[token_index, top_k_position, None]).to(final.dtype))
        return final


def replace_module(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


STRUCTURES = {
    cls.__name__: cls
    for cls in (
        LowRankLinear,
        LowRankPlusSparseLinear,
        DictionaryLinear,
        LowRankQuantLinear,
        LowRankQuantSparseLinear,
        QuantizedCorrectionLinear,
        ResizedLinear,
        HeadPaddedLinear,
        HeadSlicedLinear,
        HeadScatteredLinear,
    )
}


def build_saved_structure(model, config, prefix):
    """Unfuse the saved experts blocks and replace the saved layers of ``model``, named without ``prefix``."""
    saved = getattr(config, CONFIG_KEY, None) or {}
    for name in saved.get("unfused_experts", []):
        if name.startswith(prefix):
            replace_module(model, name[len(prefix) :], UnfusedExperts(model.get_submodule(name[len(prefix) :])))
    for name, spec in saved.get("layers", {}).items():
        if name.startswith(prefix):  # a base model has no head: a compressed lm_head is not part of it
            spec = dict(spec)
            replace_module(model, name[len(prefix) :], STRUCTURES[spec.pop("structure")](**spec))


class LowRankModel(getattr(transformers, BASE_ARCHITECTURE)):
    """``BASE_ARCHITECTURE`` with the layers lowrank compressed built in their saved structures."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        build_saved_structure(self, config, prefix="")


class LowRankBaseModel(getattr(transformers, BASE_MODEL)):
    """``BASE_MODEL`` (what ``BASE_ARCHITECTURE`` holds as its ``base_model_prefix``) with its saved structures."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        build_saved_structure(self, config, prefix="" if BASE_MODEL == BASE_ARCHITECTURE else self.base_model_prefix + ".")
