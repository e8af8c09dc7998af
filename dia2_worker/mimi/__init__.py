"""Kyutai's Mimi codec in plain PyTorch: offline and streaming decode, encode, the published checkpoint as is."""

from .codec import MimiCodec, load_mimi
from .config import MimiConfig
from .streaming import DecoderState, StreamingDecoder
from .weights import MimiCheckpointError

__all__ = ["DecoderState", "MimiCheckpointError", "MimiCodec", "MimiConfig", "StreamingDecoder", "load_mimi"]
