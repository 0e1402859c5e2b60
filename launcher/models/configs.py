"""Hugging Face configs from a stage's `model` section, and the switches applied to a built model."""

from __future__ import annotations

from typing import Any

import torch

from launcher.jobspec.models import ModelSpec


def hf_config(model: ModelSpec, vocab_size: int, special: Any, num_labels: int | None) -> Any:
    """The `transformers` config of the family at the spec's sizes (`special`: pad/bos/eos token ids)."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    inter = model.intermediate_size or 4 * model.hidden_size
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "pad_token_id": special.pad_token_id,
        "attn_implementation": model.attention,
    }
    if num_labels is not None:
        common["num_labels"] = num_labels
    if model.tie_embeddings is not None:
        common["tie_word_embeddings"] = model.tie_embeddings
    if model.family == "bert":
        if model.norm_eps is not None:
            common["layer_norm_eps"] = model.norm_eps
        return BertConfig(
            hidden_size=model.hidden_size,
            num_hidden_layers=model.num_layers,
            num_attention_heads=model.num_heads,
            intermediate_size=inter,
            max_position_embeddings=model.max_position_embeddings,
            hidden_dropout_prob=model.dropout,
            attention_probs_dropout_prob=model.dropout,
            **common,
        )
    if model.family == "gpt2":
        if model.norm_eps is not None:
            common["layer_norm_epsilon"] = model.norm_eps
        return GPT2Config(
            n_embd=model.hidden_size,
            n_layer=model.num_layers,
            n_head=model.num_heads,
            n_inner=inter,
            n_positions=model.max_position_embeddings,
            resid_pdrop=model.dropout,
            embd_pdrop=model.dropout,
            attn_pdrop=model.dropout,
            bos_token_id=special.bos_token_id,
            eos_token_id=special.eos_token_id,
            **common,
        )
    if model.norm_eps is not None:
        common["rms_norm_eps"] = model.norm_eps
    if model.rope_theta is not None:
        common["rope_theta"] = model.rope_theta
    return LlamaConfig(
        hidden_size=model.hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_kv_heads or model.num_heads,
        intermediate_size=inter,
        max_position_embeddings=model.max_position_embeddings,
        attention_dropout=model.dropout,
        bos_token_id=special.bos_token_id,
        eos_token_id=special.eos_token_id,
        **common,
    )


def apply_runtime(module: torch.nn.Module, model: ModelSpec) -> None:
    """Activation checkpointing on every `transformers` model inside `module` (an rtd pair holds two).

    Non-reentrant: it works with ZeRO-3's partitioned parameters and with inputs that need no gradient,
    and it restores the RNG state, so dropout draws the same mask when the block is recomputed.
    """
    if not model.activation_checkpointing:
        return
    from transformers import PreTrainedModel

    found = [m for m in module.modules() if isinstance(m, PreTrainedModel) and m.supports_gradient_checkpointing]
    assert found, f"{type(module).__name__} holds no transformers model that supports gradient checkpointing"
    for inner in found:
        if not inner.is_gradient_checkpointing:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
