"""Dia2 checkpoint configuration: the published `config.json`, parsed with its defaults and checked.

Only the fields the runtime uses are kept; unknown fields are ignored because the published
files carry training-only extras (dropout, first_word_min_start, max_pad, ...).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

ACTIVATIONS = ("silu", "swish", "swiglu", "gelu", "geglu", "relu", "linear")


class ConfigError(ValueError):
    """A config.json that is missing a field or holds a value the runtime cannot use."""


@dataclass(frozen=True)
class DataConfig:
    channels: int
    text_vocab_size: int
    audio_vocab_size: int
    action_vocab_size: int
    text_pad_token_id: int
    text_new_word_token_id: int
    text_zero_token_id: int
    audio_pad_token_id: int
    audio_bos_token_id: int
    delay_pattern: tuple[int, ...]
    second_stream_ahead: int
    tokenizer_path: str | None

    @property
    def num_codebooks(self) -> int:
        return self.channels - 2

    @property
    def max_delay(self) -> int:
        return max(self.delay_pattern)


@dataclass(frozen=True)
class StackConfig:
    """One transformer stack: the backbone ("decoder") or the depformer."""

    n_layer: int
    n_embd: int
    n_hidden: int
    gqa_query_heads: int
    kv_heads: int
    gqa_head_dim: int
    low_rank_dim: int | None
    mlp_activations: tuple[str, str]
    apply_rope: bool = True
    text_embedding: bool = True


@dataclass(frozen=True)
class ModelConfig:
    decoder: StackConfig
    depformer: StackConfig
    rope_min_timescale: float
    rope_max_timescale: float
    norm_eps: float


@dataclass(frozen=True)
class RuntimeConfig:
    weights_schedule: tuple[int, ...]
    max_context_steps: int


@dataclass(frozen=True)
class AssetsConfig:
    tokenizer: str | None
    mimi: str | None


@dataclass(frozen=True)
class Dia2Config:
    data: DataConfig
    model: ModelConfig
    runtime: RuntimeConfig
    assets: AssetsConfig

    @property
    def num_codebooks(self) -> int:
        return self.data.num_codebooks

    @property
    def num_stages(self) -> int:
        """Depformer stages: one per codebook after the first."""
        return self.data.num_codebooks - 1

    @property
    def stage_vocab(self) -> int:
        """Depformer logits keep only real audio tokens (pad and BOS are never sampled)."""
        return min(self.data.audio_pad_token_id, self.data.audio_bos_token_id)

    @property
    def weight_groups(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.runtime.weights_schedule)))

    @classmethod
    def load(cls, path: str | Path) -> "Dia2Config":
        return read_config(path, cls.from_dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Dia2Config":
        root = _Block(raw, "")
        data_b, model_b = root.block("data"), root.block("model")
        if raw.get("runtime") is None:
            raise ConfigError("runtime: the block is required")
        runtime_b = root.block("runtime")

        audio_vocab = data_b.int("audio_vocab_size", minimum=3)
        channels = data_b.int("channels", minimum=3)
        data = DataConfig(
            channels=channels,
            text_vocab_size=data_b.int("text_vocab_size", minimum=2),
            audio_vocab_size=audio_vocab,
            action_vocab_size=data_b.int("action_vocab_size", minimum=2),
            text_pad_token_id=data_b.int("text_pad_token_id", minimum=0),
            text_new_word_token_id=data_b.int("text_new_word_token_id", minimum=0),
            text_zero_token_id=data_b.int("text_zero_token_id", 7, minimum=0),
            audio_pad_token_id=data_b.int("audio_pad_token_id", audio_vocab - 1, minimum=0),
            audio_bos_token_id=data_b.int("audio_bos_token_id", audio_vocab - 2, minimum=0),
            delay_pattern=data_b.int_list("delay_pattern", length=channels - 2, minimum=1),
            second_stream_ahead=data_b.int("second_stream_ahead", 0, minimum=0),
            tokenizer_path=data_b.optional_str("tokenizer_path"),
        )
        for name in ("text_pad_token_id", "text_new_word_token_id", "text_zero_token_id"):
            _check_below(f"data.{name}", getattr(data, name), "data.text_vocab_size", data.text_vocab_size)
        for name in ("audio_pad_token_id", "audio_bos_token_id"):
            _check_below(f"data.{name}", getattr(data, name), "data.audio_vocab_size", audio_vocab)

        linear_acts = model_b.block("linear", optional=True).activations("mlp_activations")
        decoder = _stack(model_b.block("decoder"), linear_acts, depformer=False)
        depformer = _stack(model_b.block("depformer"), None, depformer=True)
        model = ModelConfig(
            decoder=decoder,
            depformer=depformer,
            rope_min_timescale=model_b.number("rope_min_timescale", 1.0, positive=True),
            rope_max_timescale=model_b.number("rope_max_timescale", 10000.0, positive=True),
            norm_eps=model_b.number("normalization_layer_epsilon", 1e-5, positive=True),
        )

        stages = channels - 3
        runtime = RuntimeConfig(
            weights_schedule=runtime_b.int_list(
                "weights_schedule", default=tuple(range(stages)), length=stages, minimum=0
            ),
            max_context_steps=runtime_b.int("max_context_steps", 1500, minimum=1),
        )
        assets_b = root.block("assets", optional=True)
        assets = AssetsConfig(
            tokenizer=assets_b.optional_str("tokenizer") or data.tokenizer_path,
            mimi=assets_b.optional_str("mimi"),
        )
        return cls(data=data, model=model, runtime=runtime, assets=assets)


T = TypeVar("T")


def read_config(path: str | Path, parse: Callable[[Any], T]) -> T:
    """A JSON config file through `parse`; every error names the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    try:
        return parse(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _stack(block: "_Block", default_acts: tuple[str, str] | None, *, depformer: bool) -> StackConfig:
    heads = block.int("gqa_query_heads", minimum=1)
    kv_heads = block.int("kv_heads", minimum=1)
    head_dim = block.int("gqa_head_dim", minimum=2)
    if head_dim % 2:
        raise ConfigError(f"{block.path}.gqa_head_dim: must be even for RoPE, got {head_dim}")
    if depformer and kv_heads != heads:
        raise ConfigError(
            f"{block.path}.kv_heads: the depformer's fused in_proj needs kv_heads == gqa_query_heads "
            f"({heads}), got {kv_heads}"
        )
    if heads % kv_heads:
        raise ConfigError(
            f"{block.path}.kv_heads: gqa_query_heads ({heads}) must be a multiple of kv_heads, got {kv_heads}"
        )
    low_rank = None if depformer else block.optional_int("low_rank_dim", minimum=1)
    acts = block.activations("mlp_activations") if depformer else default_acts
    return StackConfig(
        n_layer=block.int("n_layer", minimum=1),
        n_embd=block.int("n_embd", minimum=1),
        n_hidden=block.int("n_hidden", minimum=1),
        gqa_query_heads=heads,
        kv_heads=kv_heads,
        gqa_head_dim=head_dim,
        low_rank_dim=low_rank,
        mlp_activations=acts,
        apply_rope=block.bool("apply_rope", True) if depformer else True,
        text_embedding=block.bool("text_embedding", True) if depformer else True,
    )


def _check_below(name: str, value: int, limit_name: str, limit: int) -> None:
    if value >= limit:
        raise ConfigError(f"{name}: must be below {limit_name} ({limit}), got {value}")


class _Block:
    """Typed reads from one JSON object, with errors that name the dotted field path."""

    def __init__(self, raw: Any, path: str) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path or 'config'}: expected an object, got {type(raw).__name__}")
        self.raw = raw
        self.path = path

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _get(self, key: str, default: Any) -> Any:
        value = self.raw.get(key)
        if value is None:
            if default is _REQUIRED:
                raise ConfigError(f"{self._name(key)}: required field is missing")
            return default
        return value

    def block(self, key: str, optional: bool = False) -> "_Block":
        return _Block(self._get(key, {} if optional else _REQUIRED), self._name(key))

    def int(self, key: str, default: Any = None, *, minimum: int) -> int:
        value = self._get(key, _REQUIRED if default is None else default)
        return self._checked_int(self._name(key), value, minimum)

    def optional_int(self, key: str, *, minimum: int) -> int | None:
        value = self.raw.get(key)
        return None if value is None else self._checked_int(self._name(key), value, minimum)

    @staticmethod
    def _checked_int(name: str, value: Any, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{name}: must be >= {minimum}, got {value}")
        return value

    def int_list(self, key: str, default: Any = None, *, length: int, minimum: int) -> tuple[int, ...]:
        name = self._name(key)
        value = self._get(key, _REQUIRED if default is None else default)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list of integers, got {value!r}")
        if len(value) != length:
            raise ConfigError(f"{name}: expected {length} entries (one per codebook/stage), got {len(value)}")
        return tuple(self._checked_int(f"{name}[{i}]", v, minimum) for i, v in enumerate(value))

    def number(self, key: str, default: float, *, positive: bool) -> float:
        value = self._get(key, default)
        name = self._name(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        if positive and value <= 0:
            raise ConfigError(f"{name}: must be > 0, got {value}")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self._name(key)}: expected true or false, got {value!r}")
        return value

    def optional_str(self, key: str) -> str | None:
        value = self.raw.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{self._name(key)}: expected a string, got {value!r}")
        return value

    def activations(self, key: str) -> tuple[str, str]:
        name = self._name(key)
        value = self._get(key, ["silu", "linear"])
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ConfigError(f"{name}: expected two activation names, got {value!r}")
        for act in value:
            if not isinstance(act, str) or act.lower() not in ACTIVATIONS:
                raise ConfigError(f"{name}: unsupported activation {act!r} (supported: {', '.join(ACTIVATIONS)})")
        return (value[0].lower(), value[1].lower())


_REQUIRED = object()
