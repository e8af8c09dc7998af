"""The Mimi codec: waveform <-> codes, loaded from the published transformers-format directory.

Decode: codes -> code vectors (quantizer) -> upsampled to the SEANet rate (transposed conv) ->
transformer -> SEANet decoder -> waveform, all causal. Offline decode is the streaming path run with
fresh state, so the two cannot drift apart. Encode mirrors it: SEANet encoder -> transformer ->
downsampling conv -> nearest code vectors.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint import check_names_and_shapes, read_safetensors, safetensors_shapes
from .config import MimiConfig
from .conv import CausalConv1d, CausalConvTranspose1d, SEANetDecoder, SEANetEncoder
from .quantizer import SplitResidualVectorQuantizer
from .streaming import DecoderState, StreamingDecoder
from .transformer import Transformer
from .weights import MimiCheckpointError, check_published, codec_tensors, read_published

OFFLINE_CHUNK_FRAMES = 250
"""Offline decode runs in chunks of this many frames (same result, bounded attention and activation memory)."""


class MimiCodec(nn.Module):
    """Both halves of the codec; submodules carry the published names, so a checkpoint loads by name."""

    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        self.config = config
        hidden, stride = config.hidden_size, config.latent_stride
        self.encoder = SEANetEncoder(config)
        self.encoder_transformer = Transformer(config)
        self.downsample = (CausalConv1d(hidden, hidden, 2 * stride, stride, bias=False, pad_mode="replicate")
                           if stride > 1 else None)
        self.quantizer = SplitResidualVectorQuantizer(config)
        self.upsample = (CausalConvTranspose1d(hidden, hidden, 2 * stride, stride, groups=config.upsample_groups,
                                               bias=False)
                         if stride > 1 else None)
        self.decoder_transformer = Transformer(config)
        self.decoder = SEANetDecoder(config)

    # ------------------------------------------------------------------ building

    @classmethod
    def skeleton(cls, config: MimiConfig) -> MimiCodec:
        """The modules on the meta device: names and shapes only, ready to be given a checkpoint's tensors."""
        with torch.device("meta"):
            return cls(config)

    def assemble(self, tensors: Mapping[str, Tensor], device: str | torch.device) -> MimiCodec:
        """This skeleton given its own tensors (the codec's names, already on `device`): a ready codec.
        `.to` moves the buffers not in any file (RoPE frequencies), which the skeleton built on the CPU."""
        self.load_state_dict(dict(tensors), strict=True, assign=True)
        return self.to(device).eval().requires_grad_(False)

    @classmethod
    def from_tensors(cls, config: MimiConfig, tensors: Mapping[str, Tensor], device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> MimiCodec:
        """A codec from tensors under their published names, placed on `device` in `dtype` without init."""
        device = torch.device(device)
        codec = cls.skeleton(config)
        return codec.assemble(codec_tensors(codec, tensors, device, dtype), device)

    # ------------------------------------------------------------------ facts

    @property
    def sample_rate(self) -> int:
        return self.config.sampling_rate

    @property
    def frame_size(self) -> int:
        """Audio samples per code frame (1920 for kyutai/mimi)."""
        return self.config.frame_size

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.frame_size

    @property
    def num_codebooks(self) -> int:
        return self.config.num_quantizers

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ------------------------------------------------------------------ decode

    def check_codes(self, codes: Tensor) -> Tensor:
        """Codes [B, K, T] checked (shape, 1 <= K <= num_codebooks, range) -> long, on the codec's device."""
        if codes.dim() != 3:
            raise ValueError(f"codes must be [B, K, T], got shape {list(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got {codes.dtype}")
        if not 1 <= codes.shape[1] <= self.num_codebooks:
            raise ValueError(f"codes have {codes.shape[1]} codebooks; this Mimi decodes 1 to {self.num_codebooks}")
        bad = (codes < 0) | (codes >= self.codebook_size)
        if bad.any():
            b, k, t = bad.nonzero()[0].tolist()
            raise ValueError(
                f"code {int(codes[b, k, t])} at [batch {b}, codebook {k}, frame {t}] is out of range: "
                f"codes must be in [0, {self.codebook_size})"
            )
        return codes.to(self.device, torch.long)

    def init_decoder_state(self, batch: int) -> DecoderState:
        device, dtype = self.device, self.dtype
        return DecoderState(
            upsample=None if self.upsample is None else self.upsample.init_state(batch, device, dtype),
            transformer=self.decoder_transformer.init_state(batch, device, dtype),
            seanet=self.decoder.init_state(batch, device, dtype),
        )

    def decode_step(self, codes: Tensor, state: DecoderState, active: Tensor | None = None) -> Tensor:
        """The decode math: valid codes [B, K, n >= 1] -> [B, 1, n * frame_size], continuing `state` in the rows
        of the bool mask `active` [B] (None: all rows); the other rows' state is kept, their samples unspecified."""
        x = self.quantizer.decode(codes)
        if self.upsample is not None:
            x = self.upsample(x, state.upsample, active)
        x = self.decoder_transformer(x.transpose(1, 2), state.transformer, active).transpose(1, 2)
        return self.decoder(x, state.seanet, active)

    @torch.inference_mode()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes [B, K, T] (the first K codebooks) -> waveform [B, 1, T * frame_size], not clamped."""
        codes = self.check_codes(codes)
        if codes.shape[2] == 0:
            return torch.zeros(codes.shape[0], 1, 0, device=self.device, dtype=self.dtype)
        state = self.init_decoder_state(codes.shape[0])
        return torch.cat([self.decode_step(chunk, state) for chunk in codes.split(OFFLINE_CHUNK_FRAMES, dim=2)],
                         dim=2)

    def streaming_decoder(self, batch_size: int) -> StreamingDecoder:
        return StreamingDecoder(self, batch_size)

    # ------------------------------------------------------------------ encode

    @torch.inference_mode()
    def encode(self, wave: Tensor, num_codebooks: int | None = None) -> Tensor:
        """Waveform [B, 1, N] at `sample_rate` -> codes [B, K, ceil(N / frame_size)] (K: all by default)."""
        k = self.num_codebooks if num_codebooks is None else num_codebooks
        semantic = self.config.num_semantic_quantizers
        if not semantic <= k <= self.num_codebooks:
            raise ValueError(f"num_codebooks must be in [{semantic}, {self.num_codebooks}], got {k}")
        if wave.dim() != 3 or wave.shape[1] != 1 or wave.shape[2] == 0:
            raise ValueError(f"wave must be mono [B, 1, N] with N >= 1, got shape {list(wave.shape)}")
        x = self.encoder(wave.to(self.device, self.dtype))
        fresh = self.encoder_transformer.init_state(x.shape[0], self.device, self.dtype)
        x = self.encoder_transformer(x.transpose(1, 2), fresh).transpose(1, 2)
        if self.downsample is not None:
            x = self.downsample(x)
        return self.quantizer.encode(x, k)


def load_mimi(mimi_dir: str | Path, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> MimiCodec:
    """A Mimi directory (config.json + model.safetensors), checked before any tensor is read: the published
    layout, or the serving layout bake_weights.py writes (the codec's own tensors, code vectors precomputed)."""
    mimi_dir, device = Path(mimi_dir), torch.device(device)
    config = MimiConfig.load(mimi_dir / "config.json")
    path = mimi_dir / "model.safetensors"
    if not path.is_file():
        raise MimiCheckpointError(f"{path}: weights file not found")
    skeleton = MimiCodec.skeleton(config)
    shapes = safetensors_shapes(path)
    own = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    if set(shapes) == set(own):
        check_names_and_shapes(shapes, own, str(path))
        return skeleton.assemble(read_safetensors(path, None, device, dtype), device)
    check_published(shapes, skeleton, str(path))
    return skeleton.assemble(codec_tensors(skeleton, read_published(path, skeleton, device, dtype), device, dtype),
                             device)
