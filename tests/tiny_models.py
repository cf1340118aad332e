"""Small Hugging Face models built offline from configs (random weights), one per architecture."""

from __future__ import annotations

import torch
import transformers


def tiny_config(family: str) -> transformers.PretrainedConfig:
    common = dict(vocab_size=128)
    if family == "llama":
        return transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **common
        )
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
    if family == "opt":
        return transformers.OPTConfig(
            hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64, **common
        )
    if family == "qwen2":
        return transformers.Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **common
        )
    raise ValueError(family)


FAMILIES = ["llama", "gpt2", "opt", "qwen2"]


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(family)
    config.architectures = [transformers.AutoModelForCausalLM._model_mapping[type(config)].__name__]
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def token_batches(count: int = 3, seed: int = 0) -> list[dict]:
    """``count`` seeded batches of 4 random 32-token windows of the tiny vocabulary, with labels."""
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(0, 128, (4, 32), generator=generator)), "labels": ids} for _ in range(count)]


def calibrated_tiny(family: str = "llama"):
    """(dense tiny model, its statistics with gradients over :func:`token_batches`)."""
    import lowrank

    dense = tiny_model(family)
    return dense, lowrank.collect_statistics(dense, token_batches(), lowrank.find_targets(dense), gradients=True, progress=False)
