"""Named model sizes: `model.preset` fills the `model` section (and the tokenizer's vocabulary size) with a
published architecture; any field the stage sets itself wins over the preset's.

Each entry is the released model's own `config.json` (the Hugging Face Hub copy), which is also what
litgpt's `config_hub` and torchtitan's model registries carry for these families:

- bert-base, bert-large: Devlin et al. 2019 (`google-bert/bert-base-uncased`, `bert-large-uncased`);
  110 M / 335 M parameters in `BertModel`.
- gpt2, gpt2-medium: Radford et al. 2019 (`openai-community/gpt2`, `gpt2-medium`); 124 M / 355 M.
- smollm2-135m, smollm2-360m: Hugging Face's SmolLM2 (`HuggingFaceTB/SmolLM2-135M`, `-360M`), the
  llama architecture with grouped-query attention and tied embeddings; 135 M / 362 M.
- tinyllama-1.1b: TinyLlama (`TinyLlama/TinyLlama_v1.1`), llama-2's architecture at 22 layers; 1.10 B.
- vit-base-patch16: ViT-B/16 (Dosovitskiy et al. 2021; `google/vit-base-patch16-224`) at 224x224 pixels,
  the image_classification / mae encoder; 85.8 M in `ViTModel` without its pooler.
- resnet-18, resnet-50: He et al. 2016 (`microsoft/resnet-18`, `microsoft/resnet-50`), basic and bottleneck
  blocks; 11.2 M / 23.5 M in `ResNetModel` (the ImageNet classifier adds 0.5 M / 2.0 M).

Torch-free: the spec layer applies these before any model is built.
"""

from __future__ import annotations

from typing import Any

# model-section fields, plus `vocab_size` (the tokenizer's, when the stage sets none; image models have none).
PRESETS: dict[str, dict[str, Any]] = {
    "bert-base": {
        "family": "bert", "hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072,
        "max_position_embeddings": 512, "dropout": 0.1, "vocab_size": 30522,
    },
    "bert-large": {
        "family": "bert", "hidden_size": 1024, "num_layers": 24, "num_heads": 16, "intermediate_size": 4096,
        "max_position_embeddings": 512, "dropout": 0.1, "vocab_size": 30522,
    },
    "gpt2": {
        "family": "gpt2", "hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072,
        "max_position_embeddings": 1024, "dropout": 0.1, "vocab_size": 50257,
    },
    "gpt2-medium": {
        "family": "gpt2", "hidden_size": 1024, "num_layers": 24, "num_heads": 16, "intermediate_size": 4096,
        "max_position_embeddings": 1024, "dropout": 0.1, "vocab_size": 50257,
    },
    "smollm2-135m": {
        "family": "llama", "hidden_size": 576, "num_layers": 30, "num_heads": 9, "num_kv_heads": 3,
        "intermediate_size": 1536, "max_position_embeddings": 8192, "dropout": 0.0, "tie_embeddings": True,
        "rope_theta": 100000.0, "norm_eps": 1e-5, "vocab_size": 49152,
    },
    "smollm2-360m": {
        "family": "llama", "hidden_size": 960, "num_layers": 32, "num_heads": 15, "num_kv_heads": 5,
        "intermediate_size": 2560, "max_position_embeddings": 8192, "dropout": 0.0, "tie_embeddings": True,
        "rope_theta": 100000.0, "norm_eps": 1e-5, "vocab_size": 49152,
    },
    "tinyllama-1.1b": {
        "family": "llama", "hidden_size": 2048, "num_layers": 22, "num_heads": 32, "num_kv_heads": 4,
        "intermediate_size": 5632, "max_position_embeddings": 2048, "dropout": 0.0, "tie_embeddings": False,
        "rope_theta": 10000.0, "norm_eps": 1e-5, "vocab_size": 32000,
    },
    "vit-base-patch16": {
        "family": "vit", "hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072,
        "patch_size": 16, "dropout": 0.0,
    },
    "resnet-18": {"family": "resnet", "hidden_size": 64, "num_layers": 4, "depths": [2, 2, 2, 2], "block": "basic"},
    "resnet-50": {
        "family": "resnet", "hidden_size": 256, "num_layers": 4, "depths": [3, 4, 6, 3], "block": "bottleneck",
    },
}  # fmt: skip

# Parameters as published, what a preset must build (checked by a test): BERT's encoder (`BertModel`), a
# decoder's causal LM (its output layer counted once when tied to the embeddings), an image model's backbone
# (`ViTModel` without its pooler, `ResNetModel`).
PUBLISHED_PARAMS: dict[str, int] = {
    "bert-base": 109_482_240,
    "bert-large": 335_141_888,
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "tinyllama-1.1b": 1_100_048_384,
    "vit-base-patch16": 85_798_656,
    "resnet-18": 11_176_512,
    "resnet-50": 23_508_032,
}


def preset_fields(name: str) -> dict[str, Any]:
    """The model-section fields of preset `name` (ValueError listing the presets when it is unknown)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return {key: value for key, value in PRESETS[name].items() if key != "vocab_size"}


def preset_vocab_size(name: str) -> int | None:
    return PRESETS[name].get("vocab_size") if name in PRESETS else None
