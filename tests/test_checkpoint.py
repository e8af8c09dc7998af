"""Config parsing and checkpoint loading: published defaults and the clear errors for bad files."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dia2_worker.checkpoint import (CheckpointError, build_model, engine_shapes, fuse_published,
                                    load_published_weights, published_shapes)
from dia2_worker.config import ConfigError, Dia2Config

MINIMAL = {
    "data": {"channels": 10, "text_vocab_size": 8, "audio_vocab_size": 2050, "action_vocab_size": 2,
             "text_pad_token_id": 3, "text_new_word_token_id": 2, "action_pad_token_id": 0,
             "action_new_word_token_id": 1, "delay_pattern": [1, 2, 2, 2, 3, 3, 3, 3]},
    "model": {"decoder": {"n_layer": 1, "n_embd": 8, "n_hidden": 8, "gqa_query_heads": 2, "kv_heads": 1,
                          "gqa_head_dim": 8},
              "depformer": {"n_layer": 1, "n_embd": 8, "n_hidden": 8, "gqa_query_heads": 1, "kv_heads": 1,
                            "gqa_head_dim": 8}},
    "runtime": {},
}


@pytest.fixture(scope="module")
def tiny_config(tiny_dir) -> Dia2Config:
    return Dia2Config.load(tiny_dir / "config.json")


def test_published_defaults():
    config = Dia2Config.from_dict(MINIMAL)
    assert config.num_codebooks == 8 and config.num_stages == 7
    assert (config.data.audio_pad_token_id, config.data.audio_bos_token_id) == (2049, 2048)
    assert config.data.text_zero_token_id == 7 and config.data.second_stream_ahead == 0
    assert config.runtime.weights_schedule == tuple(range(7)) and config.runtime.max_context_steps == 1500
    assert config.model.decoder.mlp_activations == ("silu", "linear")
    assert config.model.depformer.apply_rope and config.model.depformer.text_embedding
    assert (config.model.rope_min_timescale, config.model.rope_max_timescale, config.model.norm_eps) == (
        1.0, 10000.0, 1e-5)
    assert config.assets.tokenizer is None and config.assets.mimi is None


def test_tiny_config(tiny_config):
    assert tiny_config.data.delay_pattern == (2, 3, 3, 3, 4, 4, 4, 4)
    assert tiny_config.runtime.weights_schedule == (0, 1, 1, 2, 2, 2, 2)
    assert tiny_config.weight_groups == (0, 1, 2) and tiny_config.stage_vocab == 128


def _with(path: str, value) -> dict:
    raw = copy.deepcopy(MINIMAL)
    *parents, key = path.split(".")
    node = raw
    for part in parents:
        node = node[part]
    if value is ...:
        del node[key]
    else:
        node[key] = value
    return raw


@pytest.mark.parametrize("path,value,message", [
    ("data.channels", ..., "data.channels: required field is missing"),
    ("model.decoder.n_embd", ..., "model.decoder.n_embd: required field is missing"),
    ("runtime", ..., "runtime: the block is required"),
    ("data.channels", "ten", "data.channels: expected an integer"),
    ("data.channels", True, "data.channels: expected an integer"),
    ("data.delay_pattern", [1, 2], "data.delay_pattern: expected 8 entries"),
    ("data.delay_pattern", [0, 1, 1, 1, 1, 1, 1, 1], r"data.delay_pattern\[0\]: must be >= 1"),
    ("runtime.weights_schedule", [0, 1], "runtime.weights_schedule: expected 7 entries"),
    ("runtime.max_context_steps", 0, "runtime.max_context_steps: must be >= 1"),
    ("model.decoder.kv_heads", 3, "model.decoder.kv_heads: gqa_query_heads"),
    ("model.depformer.kv_heads", 2, "model.depformer.kv_heads"),
    ("model.decoder.gqa_head_dim", 7, "model.decoder.gqa_head_dim: must be even"),
    ("model.depformer.mlp_activations", ["tanh", "linear"], "unsupported activation 'tanh'"),
    ("data.text_new_word_token_id", 8, "data.text_new_word_token_id: must be below data.text_vocab_size"),
    ("data.audio_bos_token_id", 5000, "data.audio_bos_token_id: must be below data.audio_vocab_size"),
    ("model.normalization_layer_epsilon", -1.0, "model.normalization_layer_epsilon: must be > 0"),
])
def test_bad_config_names_the_field(path, value, message):
    with pytest.raises(ConfigError, match=message):
        Dia2Config.from_dict(_with(path, value))


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        Dia2Config.load(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Dia2Config.load(tmp_path / "config.json")


def test_published_names_are_the_spec_names(tiny_config, tiny_dir):
    found = {name: tuple(t.shape) for name, t in load_file(str(tiny_dir / "model.safetensors")).items()}
    assert found == published_shapes(tiny_config)


def test_fusion_round_trip(tiny_config, tiny_dir):
    published = load_file(str(tiny_dir / "model.safetensors"))
    engine = fuse_published(published, tiny_config)
    assert set(engine) == set(engine_shapes(tiny_config))
    qkv = engine["transformer.layers.1.attn.qkv.weight"]
    assert torch.equal(qkv, torch.cat([published[f"transformer.layers.1.attn.{p}_proj.weight"] for p in "qkv"]))
    table = engine["transformer.audio_embed.weight"].view(8, 130, -1)
    assert torch.equal(table[5], published["transformer.audio_embeds.5.weight"])


def _broken_checkpoint(tmp_path, tiny_dir, edit) -> str:
    tensors = load_file(str(tiny_dir / "model.safetensors"))
    edit(tensors)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path


def test_missing_unexpected_and_misshaped_tensors_are_listed(tmp_path, tiny_dir, tiny_config):
    def edit(t):
        del t["transformer.layers.0.attn.k_proj.weight"]
        del t["depformer.logits.6.weight"]
        t["transformer.extra.weight"] = torch.zeros(2)
        t["transformer.norm.weight"] = torch.zeros(31)

    path = _broken_checkpoint(tmp_path, tiny_dir, edit)
    with pytest.raises(CheckpointError) as info:
        load_published_weights(path, tiny_config, torch.device("cpu"), torch.float32)
    message = str(info.value)
    assert "missing tensors: depformer.logits.6.weight, transformer.layers.0.attn.k_proj.weight" in message
    assert "unexpected tensors: transformer.extra.weight" in message
    assert "transformer.norm.weight has shape [31], expected [32]" in message


def test_missing_weights_file(tmp_path, tiny_config):
    with pytest.raises(CheckpointError, match="weights file not found"):
        load_published_weights(tmp_path / "model.safetensors", tiny_config, torch.device("cpu"), torch.float32)


def test_weights_load_in_the_requested_dtype(tiny_dir, tiny_config):
    tensors = load_published_weights(tiny_dir / "model.safetensors", tiny_config, torch.device("cpu"),
                                     torch.bfloat16)
    model = build_model(tiny_config, tensors)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())


def test_config_shapes_must_match_the_weights(tmp_path, tiny_dir):
    raw = json.loads((tiny_dir / "config.json").read_text())
    raw["model"]["decoder"]["n_hidden"] = 48
    config = Dia2Config.from_dict(raw)
    with pytest.raises(CheckpointError, match="transformer.layers.0.mlp.wi.weight has shape"):
        load_published_weights(tiny_dir / "model.safetensors", config, torch.device("cpu"), torch.float32)
