"""The architecture matrix: one tiny model per transformer family, built offline from a config.

Each :class:`Architecture` row says how to build the model and how to feed it; the tests in
``tests/test_architectures.py`` compress → save → load every row, and :func:`render_table` builds
every row to write the README's "Supported architectures" table, so the table cannot drift from
what is tested. Adding a family is adding one row to ``ARCHITECTURES``.

    python tests/architectures.py --write-readme   # refresh the README table
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lowrank.nn import find_blocks, find_targets, is_conv1d, unfuse_experts

VOCAB = 128
README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- architectures:start -->", "<!-- architectures:end -->"


def decoder_batch(generator: torch.Generator, batch: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    """A causal LM's input: token ids only."""
    return {"input_ids": torch.randint(0, VOCAB, (batch, length), generator=generator)}


def encoder_batch(generator: torch.Generator, batch: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    """An encoder's input: token ids and an attention mask with the second sentence right-padded."""
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1:, length // 2 :] = 0
    return {"input_ids": torch.randint(0, VOCAB, (batch, length), generator=generator), "attention_mask": mask}


def seq2seq_batch(generator: torch.Generator, batch: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    """An encoder-decoder's input: source ids and (shorter) decoder ids, so both stacks run."""
    return {
        "input_ids": torch.randint(0, VOCAB, (batch, length), generator=generator),
        "decoder_input_ids": torch.randint(0, VOCAB, (batch, length // 2), generator=generator),
    }


@dataclass(frozen=True)
class Architecture:
    """One row of the matrix.

    Attributes:
        name: short family name (the README's first column).
        config_class: the transformers config class.
        config: keyword arguments of a tiny config (hidden 32–64, 2 layers, vocabulary ``VOCAB``).
        auto_class: the Auto class that builds the model (its mapping names the concrete class).
        make_batch: ``make_batch(generator) -> dict`` of model inputs, for calibration and checks.
        targets_per_block: ``{stack name: number of linear layers compressed in each block}``, the
            expectation the test checks ``find_blocks``/``find_targets`` against.
        notes: what the row exercises (fused projections, GQA, ...), for readers of this file.
    """

    name: str
    config_class: type[transformers.PretrainedConfig]
    config: dict
    auto_class: type = transformers.AutoModelForCausalLM
    make_batch: Callable[[torch.Generator], dict[str, torch.Tensor]] = decoder_batch
    targets_per_block: dict[str, int] = field(default_factory=dict)
    notes: str = ""

    def build(self, seed: int = 0) -> nn.Module:
        """The model with seeded random weights, in eval mode (dropout off)."""
        torch.manual_seed(seed)
        config = self.config_class(vocab_size=VOCAB, **self.config)
        # Saved into config.json, so that lowrank.load rebuilds the same class.
        config.architectures = [self.auto_class._model_mapping[type(config)].__name__]
        model = self.auto_class.from_config(config).eval()
        unfuse_experts(model)  # as lowrank.models.load_pretrained does: one nn.Linear per expert (no-op without experts)
        return model


DECODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
GQA = dict(DECODER, num_key_value_heads=2)

ARCHITECTURES: list[Architecture] = [
    Architecture("llama", transformers.LlamaConfig, GQA, targets_per_block={"model.layers": 7}, notes="GQA: 4 query heads, 2 key/value heads"),
    Architecture(
        "mistral", transformers.MistralConfig, dict(GQA, sliding_window=8), targets_per_block={"model.layers": 7}, notes="GQA, sliding window"
    ),
    Architecture("qwen2", transformers.Qwen2Config, GQA, targets_per_block={"model.layers": 7}, notes="GQA, biases on q/k/v"),
    Architecture("gemma", transformers.GemmaConfig, dict(GQA, head_dim=8), targets_per_block={"model.layers": 7}, notes="GQA, tied embeddings"),
    Architecture(
        "gemma2",
        transformers.Gemma2Config,
        dict(GQA, head_dim=8, sliding_window=8),
        targets_per_block={"model.layers": 7},
        notes="GQA, logit soft-capping, alternating sliding-window layers",
    ),
    Architecture(
        "phi",
        transformers.PhiConfig,
        dict(DECODER, partial_rotary_factor=0.5),
        targets_per_block={"model.layers": 6},
        notes="separate q/k/v, parallel attention and MLP (fc1/fc2) on one layer norm",
    ),
    Architecture(
        "phi3",
        transformers.Phi3Config,
        dict(GQA, pad_token_id=0, bos_token_id=0, eos_token_id=0),  # defaults lie outside the tiny vocabulary
        targets_per_block={"model.layers": 4},
        notes="fused qkv_proj (with GQA) and fused gate_up_proj",
    ),
    Architecture(
        "gpt2",
        transformers.GPT2Config,
        {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "bos_token_id": 0, "eos_token_id": 0},
        targets_per_block={"transformer.h": 4},
        notes="Conv1D layers (weights stored in × out), fused c_attn",
    ),
    Architecture(
        "gpt_neox",
        transformers.GPTNeoXConfig,
        dict(DECODER, max_position_embeddings=64),
        targets_per_block={"gpt_neox.layers": 4},
        notes="fused query_key_value, parallel residual",
    ),
    Architecture(
        "opt",
        transformers.OPTConfig,
        {
            "hidden_size": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "word_embed_proj_dim": 32,
            "max_position_embeddings": 64,
        },
        targets_per_block={"model.decoder.layers": 6},
        notes="separate q/k/v with biases, learned positions",
    ),
    Architecture(
        "falcon",
        transformers.FalconConfig,
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "new_decoder_architecture": True, "num_kv_heads": 2},
        targets_per_block={"transformer.h": 4},
        notes="new_decoder_architecture (Falcon-40B/180B layout): fused query_key_value with grouped key/value heads",
    ),
    Architecture(
        "falcon-mqa",
        transformers.FalconConfig,
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4},
        targets_per_block={"transformer.h": 4},
        notes="Falcon-7B layout: multi-query attention (one key/value head) in a fused query_key_value, parallel attention and MLP",
    ),
    Architecture(
        "mixtral",
        transformers.MixtralConfig,
        dict(GQA, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
        targets_per_block={"model.layers": 12},
        notes="mixture of experts (4, top-2): fused 3-D expert weights unfused to one linear per expert projection; hub keys renamed on save",
    ),
    Architecture(
        "bert",
        transformers.BertConfig,
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64},
        auto_class=transformers.AutoModel,
        make_batch=encoder_batch,
        targets_per_block={"encoder.layer": 6},
        notes="encoder with padding mask; the pooler stays dense (outside the blocks)",
    ),
    Architecture(
        "roberta",
        transformers.RobertaConfig,
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "pad_token_id": 1,
        },
        auto_class=transformers.AutoModel,
        make_batch=encoder_batch,
        targets_per_block={"encoder.layer": 6},
        notes="encoder with padding mask",
    ),
    Architecture(
        "t5",
        transformers.T5Config,
        {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4, "decoder_start_token_id": 0},
        auto_class=transformers.AutoModelForSeq2SeqLM,
        make_batch=seq2seq_batch,
        targets_per_block={"encoder.block": 6, "decoder.block": 10},
        notes="encoder-decoder: two block stacks, cross-attention in the decoder, tied embeddings",
    ),
]

BY_NAME = {architecture.name: architecture for architecture in ARCHITECTURES}


def kind(model: nn.Module) -> str:
    """``"encoder-decoder"``, ``"decoder"`` (a causal LM) or ``"encoder"``."""
    if model.config.is_encoder_decoder:
        return "encoder-decoder"
    # Class names, not classes: reading the lazy mapping's classes would import every model family.
    if type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return "decoder"
    return "encoder"


def key_value_heads(config: transformers.PretrainedConfig) -> int:
    """Key/value heads per layer (fewer than the query heads: grouped-query attention)."""
    if getattr(config, "new_decoder_architecture", False):
        return config.num_kv_heads
    if getattr(config, "multi_query", False):
        return 1
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def block_targets(model: nn.Module) -> dict[str, list[str]]:
    """``{stack name: names, relative to the block, of the layers compressed in its first block}``."""
    targets = find_targets(model)
    return {stack: [name.removeprefix(f"{stack}.0.") for name in targets if name.startswith(f"{stack}.0.")] for stack, _ in find_blocks(model)}


def group_names(names: list[str]) -> str:
    """Layer names, compactly: ``a.{q,k,v}, b.c`` for ``a.q a.k a.v b.c``, and numbered siblings
    (experts) as one pattern with a count, ``experts.up_proj.* ×8``."""
    patterns = [re.sub(r"(?<![^.])\d+(?![^.])", "*", name) for name in names]
    counts = Counter(patterns)
    items: list[tuple[str, str]] = []  # (parent, leaf), in the model's order
    for name, pattern in zip(names, patterns):
        count = counts[pattern]
        parent, _, leaf = (name if count == 1 else pattern).rpartition(".")
        item = (parent, leaf if count == 1 else f"{leaf} ×{count}")
        if item not in items:
            items.append(item)
    by_parent: dict[str, list[str]] = {}
    for parent, leaf in items:
        by_parent.setdefault(parent, []).append(leaf)
    parts = []
    for parent, leaves in by_parent.items():
        leaf_text = leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves) + "}"
        parts.append(f"{parent}.{leaf_text}" if parent else leaf_text)
    return ", ".join(parts)


def features(model: nn.Module) -> list[str]:
    """What the built model exercises, read from the model and its config."""
    config, targets = model.config, find_targets(model)
    found = [] if kind(model) == "decoder" else [kind(model)]
    heads, kv_heads = config.num_attention_heads, key_value_heads(config)
    if kv_heads < heads:
        found.append(f"{'multi-query' if kv_heads == 1 else 'GQA'} ({heads} q / {kv_heads} kv head{'s' if kv_heads > 1 else ''})")
    fused = [leaf for leaf in (name.rpartition(".")[2] for name in targets) if re.search(r"qkv|query_key_value|c_attn", leaf, re.IGNORECASE)]
    if fused:
        found.append(f"fused QKV (`{fused[0]}`)")
    if any(name.endswith("gate_up_proj") for name in targets):
        found.append("fused gate/up")
    if any(is_conv1d(model.get_submodule(name)) for name in targets):
        found.append("Conv1D")
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if experts:
        found.append(f"MoE ({experts} experts)")
    return found


def render_table(architectures: list[Architecture] = ARCHITECTURES) -> str:
    """The Markdown table of supported architectures, computed by building every row."""
    lines = [
        "| architecture | transformers class | blocks found | layers compressed per block | features |",
        "|---|---|---|---|---|",
    ]
    for architecture in architectures:
        model = architecture.build()
        stacks = find_blocks(model)
        blocks = ", ".join(f"`{name}` ×{len(stack)}" for name, stack in stacks)
        per_block = "; ".join(f"{len(names)}: `{group_names(names)}`" for names in block_targets(model).values())
        lines.append(f"| {architecture.name} | `{type(model).__name__}` | {blocks} | {per_block} | {', '.join(features(model)) or '—'} |")
    return "\n".join(lines) + "\n"


def replace_table(readme: str, table: str) -> str:
    """``readme`` with the text between the architecture markers replaced by ``table``."""
    start, end = readme.index(START) + len(START), readme.index(END)
    return readme[:start] + "\n" + table + readme[end:]


def readme_table(readme: str) -> str:
    """The table currently between the markers (empty when the markers are missing)."""
    if START not in readme or END not in readme:
        return ""
    return readme[readme.index(START) + len(START) : readme.index(END)].strip("\n") + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-readme"]:
        sys.exit("usage: python tests/architectures.py --write-readme")
    README.write_text(replace_table(README.read_text(), render_table()))
    print(f"wrote the architecture table ({len(ARCHITECTURES)} rows) to {README}")
