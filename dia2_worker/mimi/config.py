"""Mimi's configuration: the published transformers-format `config.json`, parsed and checked.

The defaults are kyutai/mimi's published values, so `MimiConfig()` is the real codec's shape; direct
construction takes every size as given, `from_dict` also applies transformers' derived defaults
(head_dim, codebook_dim). Both the older config files (top-level `rope_theta`, `frame_rate`) and the
newer ones (`rope_parameters`, `_frame_rate`) are read. Unknown fields are ignored: the files carry
training-only extras.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, read_config


@dataclass(frozen=True)
class MimiConfig:
    sampling_rate: int = 24_000
    audio_channels: int = 1
    hidden_size: int = 512
    num_filters: int = 64
    num_residual_layers: int = 1
    upsampling_ratios: tuple[int, ...] = (8, 6, 5, 4)
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    compress: int = 2
    use_conv_shortcut: bool = False
    use_causal_conv: bool = True
    pad_mode: str = "constant"
    trim_right_ratio: float = 1.0
    codebook_size: int = 2048
    codebook_dim: int = 256
    num_quantizers: int = 32
    num_semantic_quantizers: int = 1
    vector_quantization_hidden_dimension: int = 256
    upsample_groups: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 2048
    hidden_act: str = "gelu"
    norm_eps: float = 1e-5
    attention_bias: bool = False
    sliding_window: int = 250
    rope_theta: float = 10_000.0
    frame_rate: float | None = None  # None: derived from the strides (older files state it)

    def __post_init__(self) -> None:
        object.__setattr__(self, "upsampling_ratios", tuple(self.upsampling_ratios))
        self._check()

    # ------------------------------------------------------------------ derived sizes

    @property
    def hop_length(self) -> int:
        """Audio samples per SEANet latent step (the product of the conv strides)."""
        return math.prod(self.upsampling_ratios)

    @property
    def latent_stride(self) -> int:
        """SEANet latent steps per code frame: the down/upsampling conv's stride (1: no resampling convs).

        Computed as transformers does: the SEANet rate rounded up over the frame rate; the frame rate
        is the one the file states or, when it states none, the SEANet rate halved.
        """
        seanet_rate = math.ceil(self.sampling_rate / self.hop_length)
        frame_rate = self.frame_rate if self.frame_rate is not None else self.sampling_rate / (2 * self.hop_length)
        return int(seanet_rate / frame_rate)

    @property
    def frame_size(self) -> int:
        """Audio samples per code frame."""
        return self.hop_length * self.latent_stride

    @property
    def num_acoustic_quantizers(self) -> int:
        return self.num_quantizers - self.num_semantic_quantizers

    def _check(self) -> None:
        """Reject what the runtime does not implement, rather than decode it wrongly."""
        unsupported = {
            "audio_channels": (self.audio_channels, 1),
            "use_causal_conv": (self.use_causal_conv, True),
            "pad_mode": (self.pad_mode, "constant"),
            "trim_right_ratio": (self.trim_right_ratio, 1.0),
            "hidden_act": (self.hidden_act, "gelu"),
        }
        for name, (value, supported) in unsupported.items():
            if value != supported:
                raise ConfigError(f"{name}: only {supported!r} is supported, got {value!r}")
        if not 0 < self.num_semantic_quantizers < self.num_quantizers:
            raise ConfigError(
                f"num_semantic_quantizers: must be in [1, num_quantizers ({self.num_quantizers})), "
                f"got {self.num_semantic_quantizers}"
            )
        if self.codebook_dim != self.vector_quantization_hidden_dimension:
            raise ConfigError(
                f"codebook_dim ({self.codebook_dim}) must equal vector_quantization_hidden_dimension "
                f"({self.vector_quantization_hidden_dimension})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads: num_attention_heads ({self.num_attention_heads}) must be a multiple of it, "
                f"got {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim: must be even for RoPE, got {self.head_dim}")
        if self.latent_stride < 1:
            raise ConfigError(f"frame_rate: {self.frame_rate} is above the SEANet rate")
        if self.latent_stride > 1 and self.hidden_size % self.upsample_groups:
            raise ConfigError(
                f"upsample_groups: must divide hidden_size ({self.hidden_size}), got {self.upsample_groups}"
            )

    # ------------------------------------------------------------------ reading config.json

    @classmethod
    def load(cls, path: str | Path) -> MimiConfig:
        return read_config(path, cls.from_dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> MimiConfig:
        """A transformers `MimiConfig` dict; missing or null fields take kyutai/mimi's values."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config: expected an object, got {type(raw).__name__}")
        values = dict(raw)
        rope = values.get("rope_parameters") or {}
        if not isinstance(rope, Mapping):
            raise ConfigError(f"rope_parameters: expected an object, got {rope!r}")
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"rope_parameters.rope_type: only 'default' is supported, got {rope['rope_type']!r}")
        for name, fallback in (("rope_theta", rope.get("rope_theta")), ("frame_rate", values.get("_frame_rate"))):
            if values.get(name) is None:
                values[name] = fallback
        kwargs = {}
        for field in dataclasses.fields(cls):
            value = values.get(field.name)
            if value is not None:
                kwargs[field.name] = _typed(field.name, value, field.default)
        # transformers' derived defaults: a null codebook_dim is the hidden size, a missing or null
        # head_dim splits the hidden size over the heads.
        defaults = cls()
        hidden = kwargs.get("hidden_size", defaults.hidden_size)
        if "codebook_dim" in values and values["codebook_dim"] is None:
            kwargs["codebook_dim"] = hidden
        kwargs.setdefault("head_dim", hidden // kwargs.get("num_attention_heads", defaults.num_attention_heads))
        return cls(**kwargs)


def _typed(name: str, value: Any, default: Any) -> Any:
    """`value` checked against the kind of the field's default (frame_rate, default None, is a number)."""
    if isinstance(default, bool):
        kind, ok = "a boolean", isinstance(value, bool)
    elif isinstance(default, str):
        kind, ok = "a string", isinstance(value, str)
    elif isinstance(default, tuple):
        kind = "a non-empty list of positive integers"
        ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_positive_int(v) for v in value)
        value = tuple(value) if ok else value
    elif isinstance(default, float) or name == "frame_rate":
        kind = "a positive number"
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        value = float(value) if ok else value
    else:
        kind, ok = "a positive integer", _is_positive_int(value)
    if not ok:
        raise ConfigError(f"{name}: expected {kind}, got {value!r}")
    return value


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
