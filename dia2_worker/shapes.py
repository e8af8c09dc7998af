"""The published Dia2 model shapes, for random-weight stand-ins (benchmarks, cold-start measurements).

Dia2-2B's fields are those of nari-labs/Dia2-2B's config.json; where a field is not known from public
material it is solved from the published file size (7,678 MB of float32 = 1.92 B parameters): the
depformer's head size 128 and MLP width 3072, no low-rank text embedding. Dia2-1B (4,305 MB = 1.08 B
parameters) shares the 2B's vocabularies, codebooks, delays and depformer; its backbone depth and MLP
width are solved the same way and are estimates. Speed depends on bytes moved per frame, which these
shapes get right to within a percent.
"""

from __future__ import annotations

import copy

from .config import Dia2Config

_DATA = {
    "channels": 34, "text_vocab_size": 49280, "audio_vocab_size": 2050, "action_vocab_size": 2,
    "text_pad_token_id": 0, "text_new_word_token_id": 3, "text_zero_token_id": 7,
    "audio_pad_token_id": 2049, "audio_bos_token_id": 2048, "action_pad_token_id": 0,
    "action_new_word_token_id": 1, "delay_pattern": [16] + [18] * 31, "second_stream_ahead": 2,
    "first_word_min_start": 3, "max_pad": 8,
}
_DEPFORMER = {
    "n_layer": 4, "n_embd": 1024, "n_hidden": 3072, "gqa_query_heads": 8, "kv_heads": 8, "gqa_head_dim": 128,
    "apply_rope": True, "text_embedding": False,
}
_SCHEDULE = [0, 1, 2, 3] + [4] * 27


def _published(n_layer: int, n_hidden: int) -> dict:
    return {
        "data": _DATA,
        "model": {
            "decoder": {"n_layer": n_layer, "n_embd": 2048, "n_hidden": n_hidden, "gqa_query_heads": 16,
                        "kv_heads": 8, "gqa_head_dim": 128},
            "depformer": _DEPFORMER,
            "rope_min_timescale": 1, "rope_max_timescale": 10000, "normalization_layer_epsilon": 1e-6,
        },
        "runtime": {"weights_schedule": _SCHEDULE, "max_context_steps": 1500},
    }


PUBLISHED = {"2b": _published(n_layer=28, n_hidden=6144), "1b": _published(n_layer=12, n_hidden=5632)}


def published_config(shape: str) -> dict:
    """The config.json dict of a published shape ("1b" or "2b")."""
    if shape not in PUBLISHED:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(sorted(PUBLISHED))}")
    return copy.deepcopy(PUBLISHED[shape])


def parameter_count(config: Dia2Config) -> int:
    """Parameters of a model of this config (what its weights file holds)."""
    from .checkpoint import engine_shapes

    total = 0
    for shape in engine_shapes(config).values():
        count = 1
        for size in shape:
            count *= size
        total += count
    return total
