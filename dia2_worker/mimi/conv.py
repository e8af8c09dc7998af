"""Mimi's causal SEANet: convolutions, residual blocks and the encoder/decoder stacks.

Every convolution is causal (an output step sees the current and earlier input steps only), so the
decoder can stream: the same modules run with a state object per layer that carries what crosses a
call boundary (a conv's left context, a transposed conv's unfinished output tail). With fresh state,
one call over T frames is exactly the offline decode, and any split of those frames gives the same
samples. A call may also take an `active` bool mask [B]: the state of the other rows stays as it was
(their outputs are unspecified), so each row advances only on the calls that carry its frames. The
encoder runs offline only and pads as the published model does (left: the causal context; right: up to
a whole stride; zeros, or the edge value for the replicate-padded downsampling conv).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MimiConfig
from .rows import copy_rows, row_view


@dataclass
class RowBuffer:
    """A per-row state tensor [B, ...] that starts, and restarts, at zero."""

    data: Tensor

    def reset(self, rows: Tensor) -> None:
        """Zero the rows where the bool mask `rows` [B] is set."""
        self.data.masked_fill_(row_view(rows, self.data), 0.0)


class ConvHistory(RowBuffer):
    """The last `context` inputs of a causal conv [B, C_in, context]: its left padding on the next call."""


class ConvOverlap(RowBuffer):
    """A transposed conv's output tail [B, C_out, kernel - stride] (no bias) that the next input adds to."""


@dataclass
class LayerStates:
    """The state of each layer of a stack, None for stateless layers (ELU, 1-wide convs)."""

    items: list[RowBuffer | LayerStates | None]

    def reset(self, rows: Tensor) -> None:
        for item in self.items:
            if item is not None:
                item.reset(rows)


class StreamingLayer(nn.Module):
    """A layer called as layer(x, state, active): `state` carries what crosses call boundaries (None: offline),
    updated only in the rows of the bool mask `active` [B] (None: all rows)."""

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> RowBuffer | LayerStates | None:
        raise NotImplementedError


def init_layer_states(layers: nn.ModuleList, batch: int, device: torch.device, dtype: torch.dtype) -> LayerStates:
    return LayerStates([layer.init_state(batch, device, dtype) if isinstance(layer, StreamingLayer) else None
                        for layer in layers])


def run_layers(layers: nn.ModuleList, x: Tensor, states: LayerStates | None, active: Tensor | None = None) -> Tensor:
    """Apply a stack in order; `states` None runs it offline (its convs pad instead)."""
    for i, layer in enumerate(layers):
        if isinstance(layer, StreamingLayer):
            x = layer(x, None if states is None else states.items[i], active)
        else:
            x = layer(x)
    return x


class CausalConv1d(StreamingLayer):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                 bias: bool = True, pad_mode: str = "constant") -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation, bias=bias)
        self.stride = stride
        self.pad_mode = pad_mode
        # Earlier inputs each call needs: the effective kernel span minus the step.
        self.context = (kernel_size - 1) * dilation + 1 - stride

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> ConvHistory | None:
        if self.context == 0:
            return None
        return ConvHistory(torch.zeros(batch, self.conv.in_channels, self.context, device=device, dtype=dtype))

    def forward(self, x: Tensor, state: ConvHistory | None = None, active: Tensor | None = None) -> Tensor:
        """x [B, C_in, L] -> [B, C_out, ceil(L / stride)]; with `state`, continues the previous call
        (which, for stride > 1, needs every call's L to be a multiple of the stride)."""
        if state is None:
            x = F.pad(x, (self.context, -x.shape[-1] % self.stride), mode=self.pad_mode)
        else:
            x = torch.cat([state.data, x], dim=-1)
            copy_rows(state.data, x[..., -self.context:], active)
        return self.conv(x)


class CausalConvTranspose1d(StreamingLayer):
    """Upsampling by `stride`; each input step's kernel reaches `kernel - stride` outputs past its own.

    Computed as one matmul (every input step times the whole kernel) and an overlap-add of those kernel-wide
    spans, not with torch's transposed conv: on the CPU that falls back to a slow kernel for the short inputs
    of streaming (over 10x slower on the decoder's first, widest layer); on CUDA the matmul is the GEMM a
    transposed conv runs anyway. The kernel must be a whole number of strides (Mimi's are all two).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int = 1,
                 bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias)
        self.stride = stride
        self.spans = kernel_size // stride  # how many input steps add to each stride of outputs
        self.tail = kernel_size - stride

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> ConvOverlap:
        return ConvOverlap(torch.zeros(batch, self.conv.out_channels, self.tail, device=device, dtype=dtype))

    def forward(self, x: Tensor, state: ConvOverlap, active: Tensor | None = None) -> Tensor:
        """x [B, C_in, L] -> the L * stride outputs that later inputs cannot change any more."""
        B, _, L = x.shape
        groups, out_channels, stride, spans = self.conv.groups, self.conv.out_channels, self.stride, self.spans
        # weight [C_in, C_out / groups, kernel] seen as [groups, C_in / groups, C_out / groups, spans, stride];
        # z[b, t, g, o, p, r] is input step t's share of output (t + p) * stride + r.
        weight = self.conv.weight.view(groups, -1, out_channels // groups, spans, stride)
        z = torch.einsum("bgit,giopr->btgopr", x.view(B, groups, -1, L), weight)
        # Overlap-add in the matmul's time-major order (reading z in place), then one copy to channel-major.
        frames = F.pad(z[..., 0, :], (0, 0, 0, 0, 0, 0, 0, spans - 1))
        for p in range(1, spans):
            frames[:, p: p + L] += z[..., p, :]
        y = frames.permute(0, 2, 3, 1, 4).reshape(B, out_channels, -1)
        y[..., : self.tail] += state.data
        done = L * stride
        copy_rows(state.data, y[..., done:], active)
        y = y[..., :done]
        return y if self.conv.bias is None else y + self.conv.bias[:, None]


class ResidualBlock(StreamingLayer):
    """x + conv_1(elu(conv_k,dilated(elu(x)))), through a narrower hidden width."""

    def __init__(self, dim: int, hidden: int, kernel_size: int, dilation: int, conv_shortcut: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList([
            nn.ELU(), CausalConv1d(dim, hidden, kernel_size, dilation=dilation), nn.ELU(), CausalConv1d(hidden, dim, 1),
        ])
        self.shortcut = CausalConv1d(dim, dim, 1) if conv_shortcut else None

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> LayerStates:
        return init_layer_states(self.block, batch, device, dtype)

    def forward(self, x: Tensor, state: LayerStates | None = None, active: Tensor | None = None) -> Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        return residual + run_layers(self.block, x, state, active)


def _residual_blocks(config: MimiConfig, dim: int) -> list[nn.Module]:
    return [
        ResidualBlock(dim, dim // config.compress, config.residual_kernel_size, config.dilation_growth_rate**j,
                      config.use_conv_shortcut)
        for j in range(config.num_residual_layers)
    ]


class SEANetEncoder(nn.Module):
    """Waveform [B, 1, N] -> latents [B, hidden, ceil(N / hop_length)]; offline only."""

    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        dim = config.num_filters
        layers: list[nn.Module] = [CausalConv1d(config.audio_channels, dim, config.kernel_size)]
        for ratio in reversed(config.upsampling_ratios):
            layers += _residual_blocks(config, dim)
            layers += [nn.ELU(), CausalConv1d(dim, 2 * dim, 2 * ratio, stride=ratio)]
            dim *= 2
        layers += [nn.ELU(), CausalConv1d(dim, config.hidden_size, config.last_kernel_size)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        return run_layers(self.layers, x, None)


class SEANetDecoder(nn.Module):
    """Latents [B, hidden, L] -> waveform [B, 1, L * hop_length], streaming through a LayerStates."""

    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        dim = config.num_filters * 2 ** len(config.upsampling_ratios)
        layers: list[nn.Module] = [CausalConv1d(config.hidden_size, dim, config.kernel_size)]
        for ratio in config.upsampling_ratios:
            layers += [nn.ELU(), CausalConvTranspose1d(dim, dim // 2, 2 * ratio, stride=ratio)]
            dim //= 2
            layers += _residual_blocks(config, dim)
        layers += [nn.ELU(), CausalConv1d(dim, config.audio_channels, config.last_kernel_size)]
        self.layers = nn.ModuleList(layers)

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> LayerStates:
        return init_layer_states(self.layers, batch, device, dtype)

    def forward(self, x: Tensor, state: LayerStates, active: Tensor | None = None) -> Tensor:
        return run_layers(self.layers, x, state, active)
