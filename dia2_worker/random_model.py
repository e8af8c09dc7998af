"""Random-weight Dia2 models: the tiny demo checkpoint (first runs, tests) and the published shapes
(benchmarks, cold-start measurements), made without any download.

Weights are drawn so activations keep a sane scale through every layer (linear weights ~ 1/sqrt(fan-in),
norms at 1, biases at 0), so generation runs its full course: the action head picks words and pads,
the script ends, the delayed codebooks flush, Mimi turns codes into (noise) audio.
"""

from __future__ import annotations

import json
import math

import torch

from .checkpoint import build_model, engine_shapes
from .config import Dia2Config

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "[S1]", "[S2]", "<zero>", "<new_word>")

DEMO_CONFIG = {
    "data": {
        "channels": 10, "text_vocab_size": 320, "audio_vocab_size": 130, "action_vocab_size": 2,
        "text_pad_token_id": 0, "text_new_word_token_id": 7, "text_zero_token_id": 6,
        "action_pad_token_id": 0, "action_new_word_token_id": 1, "delay_pattern": [2, 3, 3, 3, 4, 4, 4, 4],
        "second_stream_ahead": 2,
    },
    "model": {
        "decoder": {"n_layer": 2, "n_embd": 64, "n_hidden": 128, "gqa_query_heads": 4, "kv_heads": 2,
                    "gqa_head_dim": 16, "low_rank_dim": 32},
        "depformer": {"n_layer": 2, "n_embd": 64, "n_hidden": 128, "gqa_query_heads": 4, "kv_heads": 4,
                      "gqa_head_dim": 16},
    },
    "runtime": {"weights_schedule": [0, 1, 1, 2, 2, 2, 2], "max_context_steps": 1500},
}
"""A tiny Dia2 in the published config format: 8 codebooks of 128, uneven delays and weight groups."""

DEMO_MIMI_CONFIG = {
    "model_type": "mimi", "sampling_rate": 24000, "audio_channels": 1, "hidden_size": 64,
    "num_filters": 8, "num_residual_layers": 1, "upsampling_ratios": [8, 6, 5, 4], "kernel_size": 7,
    "last_kernel_size": 3, "residual_kernel_size": 3, "dilation_growth_rate": 2, "use_causal_conv": True,
    "pad_mode": "constant", "compress": 2, "trim_right_ratio": 1.0, "codebook_size": 128, "codebook_dim": 32,
    "num_quantizers": 8, "num_semantic_quantizers": 1, "vector_quantization_hidden_dimension": 32,
    "upsample_groups": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 4, "head_dim": 16, "hidden_act": "gelu", "max_position_embeddings": 8000,
    "norm_eps": 1e-5, "use_cache": False, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "sliding_window": 250, "attention_dropout": 0.0, "layer_scale_initial_scale": 0.01, "attention_bias": False,
    "frame_rate": 12.5,
}
"""A tiny Mimi in transformers' config format (24 kHz, 1920 samples a frame, 8 codebooks of 128)."""


def demo_tokenizer():
    """A byte-level BPE tokenizer (the byte alphabet, no merges) with Dia2's special tokens at ids 0-7."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in SPECIAL_TOKENS])
    return tokenizer


def tokenizer_files(tokenizer) -> dict[str, str]:
    """The files of a model directory that describe `tokenizer` (what Dia2Tokenizer.from_dir reads)."""
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
               "additional_special_tokens": ["[S1]", "[S2]"]}
    return {
        "tokenizer.json": tokenizer.to_str(),
        "tokenizer_config.json": json.dumps({"tokenizer_class": "GPT2Tokenizer", **special}),
        "special_tokens_map.json": json.dumps(special),
    }


def _draw(name: str, shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    if len(shape) == 1:
        if name.endswith(".bias"):
            return torch.zeros(shape, device=device)
        value = 0.01 if name.endswith("scale") else 1.0  # Mimi's layer scales start at 0.01; norms at 1
        return torch.full(shape, value, device=device)
    if "embed" in name or name.endswith("codebooks"):
        return torch.randn(shape, generator=generator, device=device)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=generator, device=device) / math.sqrt(fan_in)


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int, device: torch.device | str,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded random tensors for a name -> shape table, drawn one at a time in float32 and cast."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    return {name: _draw(name, shape, generator, device).to(dtype) for name, shape in shapes.items()}


def random_dia2_tensors(config: Dia2Config, seed: int, device: torch.device | str,
                        dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Engine-layout tensors (what a baked model.safetensors holds) for `config`."""
    return random_tensors(engine_shapes(config), seed, device, dtype)


def random_mimi(config_dict: dict, seed: int, device: torch.device | str, dtype: torch.dtype):
    """A Mimi codec of this transformers-format config with random weights (its own tensor layout)."""
    from .mimi import MimiCodec, MimiConfig

    skeleton = MimiCodec.skeleton(MimiConfig.from_dict(config_dict))
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    return skeleton.assemble(random_tensors(shapes, seed, device, dtype), device)


def random_engine(config_dict: dict, mimi_config: dict, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, seed: int = 0):
    """A Dia2Engine of these shapes with random weights and the demo tokenizer, all in memory."""
    from .engine import Dia2Engine
    from .text import Dia2Tokenizer

    device = torch.device(device)
    config = Dia2Config.from_dict(config_dict)
    model = build_model(config, random_dia2_tensors(config, seed, device, dtype))
    tokenizer = demo_tokenizer()
    ids = {token: tokenizer.token_to_id(token) for token in ("<s>", "[S1]", "[S2]")}
    return Dia2Engine(config, model, Dia2Tokenizer(tokenizer, ids["<s>"], ids["[S1]"], ids["[S2]"]),
                      random_mimi(mimi_config, seed + 1, device, dtype), device)
