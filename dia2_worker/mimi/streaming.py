"""Streaming decode: B independent streams, each call turning new frames into exactly their new samples.

All state lives in fixed-shape tensors allocated once (conv left contexts, transposed-conv output tails,
a sliding-window KV ring with per-row step counters), updated in place. A call may carry frames for some
rows only: with an `active` mask the other rows' state stays exactly as it was, so streams that have no
frame this call (not started, finished, empty slots) cost no extra call and lose nothing. `step` has no
host sync and no branch on tensor values, so it can be captured in a CUDA graph (codes and mask copied
into static tensors before each replay); `reset` zeroes masked rows, so one stream restarts while the
others carry on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .conv import ConvOverlap, LayerStates
from .transformer import KVCache


@dataclass
class DecoderState:
    """Everything the decoder carries from one call to the next, for B rows."""

    upsample: ConvOverlap | None  # None when the codec has no frame-rate upsampling conv
    transformer: KVCache
    seanet: LayerStates

    def reset(self, rows: Tensor) -> None:
        """Restart the rows where the bool mask `rows` [B] is set."""
        if self.upsample is not None:
            self.upsample.reset(rows)
        self.transformer.reset(rows)
        self.seanet.reset(rows)


class Codec(Protocol):
    """What the decoder needs of the codec (codec.MimiCodec, which builds decoders and so imports this module)."""

    device: torch.device
    dtype: torch.dtype

    def check_codes(self, codes: Tensor) -> Tensor: ...

    def init_decoder_state(self, batch: int) -> DecoderState: ...

    def decode_step(self, codes: Tensor, state: DecoderState, active: Tensor | None = None) -> Tensor: ...


class StreamingDecoder:
    """`codec.streaming_decoder(B)`: frames [B, K, n] in, the next n * frame_size samples of each (active) row out."""

    def __init__(self, codec: Codec, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.codec = codec
        self.batch_size = batch_size
        # Normal tensors, never inference tensors (even when built inside inference mode), so code outside
        # inference mode, such as a CUDA graph captured around `step`, may update them too.
        with torch.inference_mode(False):
            self.state = codec.init_decoder_state(batch_size)

    @torch.inference_mode()
    def decode(self, codes: Tensor, active: Sequence[int] | Tensor | None = None) -> Tensor:
        """Checked: codes [B, K, n] (any device) -> [B, 1, n * frame_size] on the codec's device.

        `active` (row indices or a bool mask [B]; None: all rows) picks the rows these frames belong to; the
        others keep their state and get unspecified samples, though their codes must still be valid (zeros do).
        """
        codes = self.codec.check_codes(codes)
        if codes.shape[0] != self.batch_size:
            raise ValueError(f"codes have batch {codes.shape[0]}, this decoder has {self.batch_size} rows")
        if codes.shape[2] == 0:
            return codes.new_zeros((self.batch_size, 1, 0), dtype=self.codec.dtype)
        return self.step(codes, None if active is None else self._row_mask(active))

    @torch.inference_mode()
    def step(self, codes: Tensor, active: Tensor | None = None) -> Tensor:
        """Unchecked `decode` for graph capture: valid long codes [B, K, n >= 1] and, unless None, a bool mask
        `active` [B], both already on the device."""
        return self.decode_step(codes, active)

    def decode_step(self, codes: Tensor, active: Tensor | None = None) -> Tensor:
        """`step` for a caller already in inference mode, such as code torch.compile fuses (it cannot enter
        inference mode inside a graph that updates the state)."""
        return self.codec.decode_step(codes, self.state, active)

    @torch.inference_mode()
    def reset(self, rows: Sequence[int] | Tensor | None = None) -> None:
        """Restart some rows (indices or a bool mask [B]) or, with None, all of them."""
        self.state.reset(self._row_mask(rows))

    def _row_mask(self, rows: Sequence[int] | Tensor | None) -> Tensor:
        device = self.codec.device
        if rows is None:
            return torch.ones(self.batch_size, dtype=torch.bool, device=device)
        if isinstance(rows, Tensor) and rows.dtype == torch.bool:
            if rows.shape != (self.batch_size,):
                raise ValueError(f"a row mask must have shape [{self.batch_size}], got {list(rows.shape)}")
            return rows.to(device)
        if not isinstance(rows, Tensor):
            bad = [r for r in rows if not 0 <= r < self.batch_size]
            if bad:
                raise ValueError(f"rows {bad} out of range: this decoder has rows 0..{self.batch_size - 1}")
        index = torch.as_tensor(rows, dtype=torch.long, device=device)
        return torch.zeros(self.batch_size, dtype=torch.bool, device=device).index_fill_(0, index, True)
