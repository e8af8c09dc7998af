"""Mimi codec: golden files, transformers' MimiModel as oracle, streaming == offline (masked, batched, in a
CUDA graph), loading and CLI."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from dia2_worker import audio
from dia2_worker.config import ConfigError
from dia2_worker.mimi import MimiCheckpointError, MimiCodec, MimiConfig, load_mimi
from dia2_worker.mimi.bench import random_published_tensors, run
from dia2_worker.mimi.conv import LayerStates
from dia2_worker.mimi.streaming import StreamingDecoder
from dia2_worker.mimi.weights import published_shapes

from mimi_oracle import random_oracle, spread

ROOT = Path(__file__).resolve().parents[1]
TINY = Path(__file__).parent / "fixtures" / "dia2-tiny"
MIMI_DIR = TINY / "mimi"


def fixture_tensors() -> dict[str, torch.Tensor]:
    return load_file(str(MIMI_DIR / "model.safetensors"))


@pytest.fixture(scope="module")
def codec() -> MimiCodec:
    return load_mimi(MIMI_DIR)


@pytest.fixture(scope="module")
def lively() -> MimiCodec:
    """The fixture codec with its transformer weights redrawn. The fixture keeps transformers' init (layer
    scales 0.01, near-uniform attention), which hides step-number, window and cache mistakes in the audio."""
    tensors = fixture_tensors()
    with torch.random.fork_rng():
        torch.manual_seed(6)
        spread(tensors)
    return MimiCodec.from_tensors(MimiConfig.load(MIMI_DIR / "config.json"), tensors)


def max_diff(ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert ours.shape == reference.shape
    return (ours - reference).abs().max().item()


def assert_close_to_peak(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Within 1e-4 of the reference, relative to its peak when that is above 1 (random codecs run loud)."""
    assert max_diff(ours, reference) <= 1e-4 * max(1.0, reference.abs().max().item())


def random_codes(generator: torch.Generator, batch: int, codebooks: int, frames: int, size: int) -> torch.Tensor:
    return torch.randint(0, size, (batch, codebooks, frames), generator=generator)


def state_tensors(decoder: StreamingDecoder) -> list[tuple[torch.Tensor, int]]:
    """Every state tensor of a streaming decoder, with its batch dimension."""
    state = decoder.state
    found = [(state.transformer.keys, 1), (state.transformer.values, 1), (state.transformer.slot_step, 0),
             (state.transformer.next_step, 0), (state.upsample.data, 0)]
    stack = [state.seanet]
    while stack:
        for item in stack.pop().items:
            if isinstance(item, LayerStates):
                stack.append(item)
            elif item is not None:
                found.append((item.data, 0))
    return found


def random_chunks(generator: torch.Generator, total: int) -> list[int]:
    """Chunk sizes 1-5 summing to `total`."""
    sizes, done = [], 0
    while done < total:
        n = min(int(torch.randint(1, 6, (1,), generator=generator)), total - done)
        sizes.append(n)
        done += n
    return sizes


# ---------------------------------------------------------------------------------------------- golden


def test_golden_decode(codec: MimiCodec, golden: dict) -> None:
    wave = codec.decode(golden["mimi.codes"])
    assert wave.dtype == torch.float32
    assert wave.shape == golden["mimi.waveform"].shape == (1, 1, 30 * 1920)
    assert max_diff(wave, golden["mimi.waveform"]) <= 1e-4


def test_golden_encode(codec: MimiCodec, golden: dict) -> None:
    samples, rate = audio.read_audio(TINY / "prefix_s1.wav")
    codes = codec.encode(audio.resample(audio.to_mono(samples), rate).view(1, 1, -1))
    assert codes.dtype == torch.int64
    assert torch.equal(codes[0], golden["mimi.encode.codes"])


def test_codec_facts(codec: MimiCodec) -> None:
    assert (codec.sample_rate, codec.frame_size, codec.frame_rate) == (24_000, 1920, 12.5)
    assert (codec.num_codebooks, codec.codebook_size) == (8, 128)
    assert not any(p.requires_grad for p in codec.parameters())


# ---------------------------------------------------------------------------------------------- oracle

ORACLE_CONFIGS = {  # name: (transformers MimiConfig fields, frames to decode)
    # The fixture's shape with a short window, so the oracle's sliding-window mask cuts in.
    "fixture-shape": (40, dict(hidden_size=64, num_filters=8, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, intermediate_size=128, codebook_size=128, codebook_dim=32,
                          vector_quantization_hidden_dimension=32, num_quantizers=8, upsample_groups=64,
                          sliding_window=16)),
    # GQA, head_dim != hidden / heads, attention biases, 2 semantic codebooks, conv shortcuts, 2 residual
    # layers per stage, other kernels, dilations and ratios; longer than an offline decode chunk.
    "gqa-shortcut": (300, dict(hidden_size=48, num_filters=4, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, attention_bias=True, intermediate_size=96,
                         use_conv_shortcut=True, num_residual_layers=2, compress=4, dilation_growth_rate=3,
                         kernel_size=5, last_kernel_size=5, residual_kernel_size=5, upsampling_ratios=[4, 3, 2],
                         num_quantizers=6, num_semantic_quantizers=2, codebook_size=64, codebook_dim=16,
                         vector_quantization_hidden_dimension=16, upsample_groups=16, sliding_window=10)),
    # No quantizer projections (codebook width == hidden), two stages, one layer, window longer than the input.
    "no-projection": (600, dict(hidden_size=32, num_filters=4, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2, intermediate_size=64, codebook_size=32, codebook_dim=32,
                          vector_quantization_hidden_dimension=32, num_quantizers=3, upsample_groups=8,
                          upsampling_ratios=[2, 5], sliding_window=300)),
}


@pytest.mark.parametrize("name", ORACLE_CONFIGS)
def test_matches_transformers(name: str, tmp_path: Path) -> None:
    frames, fields = ORACLE_CONFIGS[name]
    oracle = random_oracle(tmp_path, seed=len(name), **fields)
    ours = load_mimi(tmp_path)
    generator = torch.Generator().manual_seed(1)
    n = ours.num_codebooks
    for k in sorted({n, n - 1, 1}):
        codes = random_codes(generator, 2, k, frames, ours.codebook_size)
        with torch.no_grad():
            expected = oracle.decode(codes).audio_values
        assert_close_to_peak(ours.decode(codes), expected)

    # A length that is not a whole number of frames: the encoder's right padding matters.
    wave = 0.3 * torch.randn(2, 1, 7 * ours.frame_size + 123, generator=generator)
    for k in sorted({n, ours.config.num_semantic_quantizers + 1}):
        with torch.no_grad():
            expected_codes = oracle.encode(wave, num_quantizers=k).audio_codes
        assert torch.equal(ours.encode(wave, k), expected_codes)


def test_defaults_are_kyutai_mimi() -> None:
    """The benchmark's shape (our defaults) is transformers' default MimiConfig, i.e. kyutai/mimi's."""
    from transformers import MimiConfig as OracleConfig

    theirs, ours = OracleConfig(), MimiConfig()
    for field in ("sampling_rate", "hidden_size", "num_filters", "num_residual_layers", "kernel_size",
                  "last_kernel_size", "residual_kernel_size", "dilation_growth_rate", "compress", "codebook_size",
                  "codebook_dim", "num_quantizers", "num_semantic_quantizers", "vector_quantization_hidden_dimension",
                  "upsample_groups", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "norm_eps", "sliding_window", "frame_size", "latent_stride"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert list(ours.upsampling_ratios) == theirs.upsampling_ratios
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert (ours.num_quantizers, ours.codebook_size, ours.frame_size) == (32, 2048, 1920)


def test_reads_older_config_files() -> None:
    """kyutai/mimi's config.json as first published: top-level rope_theta, explicit frame_rate."""
    old = {"codebook_dim": 256, "frame_rate": 12.5, "head_dim": 64, "rope_theta": 10000.0, "hidden_size": 512,
           "upsampling_ratios": [8, 6, 5, 4], "model_type": "mimi", "torch_dtype": "float32"}
    config = MimiConfig.from_dict(old)
    assert config.frame_rate == 12.5
    assert dataclasses.replace(config, frame_rate=None) == MimiConfig()
    assert (config.frame_size, config.latent_stride) == (1920, 2)


def test_config_derived_defaults() -> None:
    """As transformers: a missing or null head_dim is hidden / heads, a null codebook_dim the hidden size."""
    config = MimiConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4,
                                   "head_dim": None, "codebook_dim": None,
                                   "vector_quantization_hidden_dimension": 64, "upsample_groups": 64})
    assert (config.head_dim, config.codebook_dim) == (16, 64)
    assert MimiConfig.from_dict({}).head_dim == 64


@pytest.mark.parametrize("field, value", [("use_causal_conv", False), ("pad_mode", "reflect"), ("audio_channels", 2),
                                          ("num_semantic_quantizers", 8), ("hidden_size", "64"),
                                          ("upsampling_ratios", [8, 0]), ("rope_parameters", {"rope_type": "yarn"})])
def test_config_rejects(field: str, value: object) -> None:
    raw = json.loads((MIMI_DIR / "config.json").read_text())
    with pytest.raises(ConfigError, match=field):
        MimiConfig.from_dict({**raw, field: value})


# ---------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("which", ["fixture", "lively"])
def test_streaming_equals_offline(which: str, request: pytest.FixtureRequest) -> None:
    """Long sequences (past the 250-step window: 2 steps per frame) in random chunks of 1-5 frames."""
    codec = request.getfixturevalue("codec" if which == "fixture" else "lively")
    generator = torch.Generator().manual_seed(2)
    decoder = codec.streaming_decoder(1)
    for frames, k in ((300, 8), (311, 5)):
        codes = random_codes(generator, 1, k, frames, codec.codebook_size)
        decoder.reset()
        pieces, start = [], 0
        for n in random_chunks(generator, frames):
            piece = decoder.decode(codes[:, :, start: start + n])
            assert piece.shape == (1, 1, n * codec.frame_size)
            pieces.append(piece)
            start += n
        assert max_diff(torch.cat(pieces, dim=2), codec.decode(codes)) <= 1e-4


def test_streaming_reset_forms(lively: MimiCodec) -> None:
    """reset(None) restarts all rows, a bool mask the rows it selects; bad rows are refused."""
    codec = lively
    codes = random_codes(torch.Generator().manual_seed(4), 2, 8, 6, codec.codebook_size)
    decoder = codec.streaming_decoder(2)
    first = decoder.decode(codes)
    decoder.reset(torch.tensor([False, True]))
    again = decoder.decode(codes)
    assert torch.equal(again[1], first[1]) and not torch.allclose(again[0], first[0])
    decoder.reset()
    assert torch.equal(decoder.decode(codes), first)
    with pytest.raises(ValueError, match=r"rows \[2\] out of range"):
        decoder.reset([2])
    with pytest.raises(ValueError, match="batch 1, this decoder has 2 rows"):
        decoder.decode(codes[:1])
    assert decoder.decode(codes[:, :, :0]).shape == (2, 1, 0)


def test_streaming_state_is_fixed_size(codec: MimiCodec) -> None:
    """State tensors keep their shapes and storage across calls: allocated once, updated in place, and
    ordinary tensors (not inference tensors) even when the decoder is made in inference mode."""
    with torch.inference_mode():
        decoder = codec.streaming_decoder(2)
    tensors = [t for t, _ in state_tensors(decoder)]
    before = [(t.data_ptr(), t.shape) for t in tensors]
    assert len(before) > 10 and not any(t.is_inference() for t in tensors)
    assert decoder.state.transformer.keys.shape[3] == codec.config.sliding_window
    codes = random_codes(torch.Generator().manual_seed(5), 2, 8, 130, codec.codebook_size)
    for start in range(0, 130, 5):
        decoder.decode(codes[:, :, start: start + 5], active=[0, 1] if start % 10 else None)
    assert [(t.data_ptr(), t.shape) for t, _ in state_tensors(decoder)] == before
    assert decoder.state.transformer.next_step.tolist() == [260, 260]


class MaskedFeed:
    """Rows fed as the scheduler feeds one batched decoder: each call carries the next n frames of a random
    subset of rows, the other rows get garbage codes (and must keep their state); a row that has decoded
    a sequence moves on to its next one through a reset, and one with none left only ever gets garbage."""

    def __init__(self, generator: torch.Generator, sequences: list[list[torch.Tensor]], codebook_size: int,
                 max_frames: int) -> None:
        self.generator, self.sequences = generator, sequences  # per row: code sequences [1, K, T], in order
        self.codebook_size, self.max_frames = codebook_size, max_frames
        self.current = [0] * len(sequences)  # the sequence each row is on
        self.fed = [0] * len(sequences)      # frames of it fed so far
        self.outputs: list[list[list[torch.Tensor]]] = [[[] for _ in row] for row in sequences]
        self.last_rows: list[int] = []

    def left(self, row: int) -> int:
        return self.sequences[row][self.current[row]].shape[2] - self.fed[row]

    def next_call(self) -> tuple[list[int], torch.Tensor, torch.Tensor] | None:
        """(rows to reset first, codes [B, K, n], active [B]) of the next call, or None when all is fed."""
        rows = range(len(self.sequences))
        resets = [r for r in rows if self.left(r) == 0 and self.current[r] + 1 < len(self.sequences[r])]
        for r in resets:
            self.current[r], self.fed[r] = self.current[r] + 1, 0
        most = max(self.left(r) for r in rows)
        if most == 0:
            return None
        n = min(int(torch.randint(1, self.max_frames + 1, (1,), generator=self.generator)), most)
        draw = torch.rand(len(self.sequences), generator=self.generator) < 0.6
        active = torch.tensor([self.left(r) >= n for r in rows]) & draw
        codes = random_codes(self.generator, len(self.sequences), self.sequences[0][0].shape[1], n,
                             self.codebook_size)
        self.last_rows = [r for r in rows if active[r]]
        for r in self.last_rows:
            codes[r] = self.sequences[r][self.current[r]][0, :, self.fed[r]: self.fed[r] + n]
            self.fed[r] += n
        return resets, codes, active

    def record(self, out: torch.Tensor) -> None:
        """Keep the samples of the last call's active rows."""
        for r in self.last_rows:
            self.outputs[r][self.current[r]].append(out[r])

    def check(self, codec: MimiCodec) -> None:
        """Every sequence, put together from its rows' active calls, is its offline decode."""
        for row, sequences in enumerate(self.sequences):
            for sequence, pieces in zip(sequences, self.outputs[row], strict=True):
                assert max_diff(torch.cat(pieces, dim=-1), codec.decode(sequence)[0]) <= 1e-4, row


def masked_feed(codec: MimiCodec, seed: int, max_frames: int) -> MaskedFeed:
    """Four rows of 300+ frames each (the window is 125 frames), two of them restarting midway."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [[310], [140, 180], [300], [150, 160]]
    sequences = [[random_codes(generator, 1, 8, n, codec.codebook_size) for n in row] for row in lengths]
    return MaskedFeed(generator, sequences, codec.codebook_size, max_frames)


@pytest.mark.parametrize("which", ["fixture", "lively"])
def test_masked_streaming_equals_offline(which: str, request: pytest.FixtureRequest) -> None:
    """Random rows active per call (1-3 frames each), garbage codes elsewhere, resets midway, rows finishing
    early; calls with every row active go unmasked: each row's active outputs are its own offline decode."""
    codec = request.getfixturevalue("codec" if which == "fixture" else "lively")
    feed = masked_feed(codec, seed=7, max_frames=3)
    decoder = codec.streaming_decoder(4)
    while (call := feed.next_call()) is not None:
        resets, codes, active = call
        if resets:
            decoder.reset(resets)
        out = decoder.decode(codes, None if active.all() else active)
        assert out.shape == (4, 1, codes.shape[2] * codec.frame_size)
        feed.record(out)
    feed.check(codec)


@pytest.mark.parametrize("which", ["fixture", "lively"])
def test_masked_call_keeps_inactive_state(which: str, request: pytest.FixtureRequest) -> None:
    """After a masked call, every state tensor of the inactive rows is bitwise what it was (the KV ring
    has wrapped, the rows' step counters differ); the active rows moved on."""
    codec = request.getfixturevalue("codec" if which == "fixture" else "lively")
    generator = torch.Generator().manual_seed(8)
    decoder = codec.streaming_decoder(4)
    decoder.decode(random_codes(generator, 4, 8, 140, codec.codebook_size))
    decoder.decode(random_codes(generator, 4, 8, 3, codec.codebook_size), active=[0, 3])
    before = [t.clone() for t, _ in state_tensors(decoder)]

    decoder.decode(random_codes(generator, 4, 8, 2, codec.codebook_size), torch.tensor([True, False, True, False]))
    inactive = torch.tensor([1, 3])
    for (tensor, dim), old in zip(state_tensors(decoder), before, strict=True):
        assert torch.equal(tensor.index_select(dim, inactive), old.index_select(dim, inactive))
    assert decoder.state.transformer.next_step.tolist() == [290, 280, 284, 286]
    assert not torch.equal(decoder.state.transformer.keys[:, 0], before[0][:, 0])  # row 0's keys moved on

    before = [t.clone() for t, _ in state_tensors(decoder)]
    decoder.decode(random_codes(generator, 4, 8, 1, codec.codebook_size), active=[])
    assert all(torch.equal(t, old) for (t, _), old in zip(state_tensors(decoder), before, strict=True))
    with pytest.raises(ValueError, match=r"a row mask must have shape \[4\]"):
        decoder.decode(random_codes(generator, 4, 8, 1, codec.codebook_size), torch.ones(3, dtype=torch.bool))


HOST_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::nonzero",
            "aten::masked_select", "aten::lift_fresh", "aten::lift_fresh_copy"}
"""Ops a CUDA graph cannot capture: they read a value back to the host (.item(), .tolist(), `if tensor`,
nonzero, masked_select) or make a tensor from host data (torch.tensor)."""


class OpNames(TorchDispatchMode):
    """The names of the aten ops run under it; a boolean-mask index (a hidden nonzero) as "boolean index"."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func: torch._ops.OpOverload, types: tuple, args: tuple = (),
                           kwargs: dict | None = None) -> object:
        name = func._schema.name
        if name.startswith("aten::index") and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                                  for i in args[1] or ()):
            name = "boolean index"
        self.names.add(name)
        return func(*args, **(kwargs or {}))


def test_step_never_waits_for_the_host(lively: MimiCodec) -> None:
    """`step`, masked or not, runs no op that syncs with the host: the CPU-side half of graph capturability."""
    decoder = lively.streaming_decoder(4)
    codes = torch.zeros(4, 8, 2, dtype=torch.long)
    active = torch.tensor([True, False, True, True])
    with OpNames() as ops:
        decoder.step(codes, active)
        decoder.step(codes)
    found = ops.names & (HOST_OPS | {"boolean index"})
    assert "aten::scaled_dot_product_attention" in ops.names and not found, found


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masked_step_in_cuda_graph(lively: MimiCodec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`step` for 4 rows captured once in a CUDA graph, then replayed with each call's codes and mask copied
    into its static inputs (one frame per call, resets in between): each row is its offline decode."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full float32 convs: compared at 1e-4
    # The serving layout, loaded as the worker loads it.
    shutil.copyfile(MIMI_DIR / "config.json", tmp_path / "config.json")
    save_file(lively.state_dict(), str(tmp_path / "model.safetensors"))
    codec = load_mimi(tmp_path, "cuda")
    decoder = codec.streaming_decoder(4)
    codes = torch.zeros(4, 8, 1, dtype=torch.long, device="cuda")
    active = torch.zeros(4, dtype=torch.bool, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            decoder.step(codes, active)  # no row active: warms up without moving any row
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decoder.step(codes, active)

    feed = masked_feed(codec, seed=9, max_frames=1)
    while (call := feed.next_call()) is not None:
        resets, call_codes, call_active = call
        if resets:
            decoder.reset(resets)
        codes.copy_(call_codes)
        active.copy_(call_active)
        graph.replay()
        feed.record(out.clone())
    feed.check(codec)


# ---------------------------------------------------------------------------------------------- errors


def test_code_errors(codec: MimiCodec) -> None:
    codes = torch.zeros(1, 8, 4, dtype=torch.long)
    bad = codes.clone()
    bad[0, 3, 2] = 128
    with pytest.raises(ValueError, match=r"code 128 at \[batch 0, codebook 3, frame 2\].*\[0, 128\)"):
        codec.decode(bad)
    bad[0, 3, 2] = -1
    with pytest.raises(ValueError, match=r"code -1 .*\[0, 128\)"):
        codec.streaming_decoder(1).decode(bad)
    with pytest.raises(ValueError, match="codes have 9 codebooks; this Mimi decodes 1 to 8"):
        codec.decode(torch.zeros(1, 9, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, K, T\]"):
        codec.decode(codes[0])
    with pytest.raises(ValueError, match="integers"):
        codec.decode(codes.float())
    with pytest.raises(ValueError, match=r"num_codebooks must be in \[1, 8\], got 9"):
        codec.encode(torch.zeros(1, 1, 1920), 9)
    with pytest.raises(ValueError, match=r"mono \[B, 1, N\]"):
        codec.encode(torch.zeros(1, 2, 1920))


def _write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text((MIMI_DIR / "config.json").read_text())
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def test_loader_names_every_problem(tmp_path: Path) -> None:
    tensors = fixture_tensors()
    del tensors["decoder_transformer.layers.1.mlp.fc2.weight"]
    del tensors["quantizer.acoustic_residual_vector_quantizer.layers.6.codebook.embed_sum"]
    tensors["decoder.layers.99.conv.weight"] = torch.zeros(1)
    tensors["upsample.conv.weight"] = torch.zeros(64, 1, 3)
    with pytest.raises(MimiCheckpointError) as info:
        load_mimi(_write_checkpoint(tmp_path / "bad", tensors))
    message = str(info.value)
    for part in ("missing tensors", "decoder_transformer.layers.1.mlp.fc2.weight",
                 "quantizer.acoustic_residual_vector_quantizer.layers.6.codebook.embed_sum",
                 "unexpected tensors", "decoder.layers.99.conv.weight",
                 "upsample.conv.weight has shape [64, 1, 3], expected [64, 1, 4]"):
        assert part in message
    with pytest.raises(MimiCheckpointError, match="decoder.layers.99.conv.weight"):
        MimiCodec.from_tensors(MimiConfig.load(MIMI_DIR / "config.json"), tensors)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((MIMI_DIR / "config.json").read_text())
    with pytest.raises(MimiCheckpointError, match="weights file not found"):
        load_mimi(no_weights)
    with pytest.raises(ConfigError, match="file not found"):
        load_mimi(tmp_path)


def test_codebooks_from_statistics(tmp_path: Path, codec: MimiCodec) -> None:
    """Code vectors are embed_sum / max(cluster_usage, 1e-5); the unused `initialized` flags may be absent."""
    tensors = fixture_tensors()
    name = "quantizer.acoustic_residual_vector_quantizer.layers.2.codebook."
    tensors[name + "cluster_usage"][:2] = torch.tensor([0.0, 2.0])
    for key in [k for k in tensors if k.endswith(".initialized")]:
        del tensors[key]
    loaded = load_mimi(_write_checkpoint(tmp_path / "stats", tensors))
    books = loaded.quantizer.acoustic_residual_vector_quantizer.codebooks
    embed_sum = tensors[name + "embed_sum"]
    torch.testing.assert_close(books[2, 0], embed_sum[0] / 1e-5, rtol=1e-6, atol=0)
    torch.testing.assert_close(books[2, 1], embed_sum[1] / 2.0, rtol=1e-6, atol=0)
    assert torch.equal(books[3], codec.quantizer.acoustic_residual_vector_quantizer.codebooks[3])


def test_from_tensors_places_weights(golden: dict) -> None:
    """Weights land in the target dtype directly, and the codec runs in it (bfloat16 checked on the CPU)."""
    config = MimiConfig.load(MIMI_DIR / "config.json")
    codec = MimiCodec.from_tensors(config, fixture_tensors(), "cpu", torch.bfloat16)
    assert {p.dtype for p in codec.state_dict().values()} == {torch.bfloat16}
    assert codec.decoder_transformer.rotary.inv_freq.dtype == torch.float32
    wave = codec.decode(golden["mimi.codes"])
    assert wave.dtype == torch.bfloat16 and torch.isfinite(wave).all()
    reference = golden["mimi.waveform"]
    assert (wave.float() - reference).norm() < 0.1 * reference.norm()


def test_published_names_match_fixture() -> None:
    """Our modules, renamed back, are exactly the published tensor set of the fixture (plus unused flags)."""
    config = MimiConfig.load(MIMI_DIR / "config.json")
    required, unused = published_shapes(MimiCodec.skeleton(config))
    found = {name: tuple(t.shape) for name, t in fixture_tensors().items()}
    assert {n: s for n, s in found.items() if n not in unused} == required


# ---------------------------------------------------------------------------------------------- CLI, bench


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dia2_worker.mimi", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_decode_and_encode(tmp_path: Path, golden: dict) -> None:
    codes = tmp_path / "codes.npy"
    np.save(codes, golden["mimi.codes"][0].numpy())
    done = _cli("decode", "--mimi-dir", str(MIMI_DIR), "--codes", str(codes), "--out", str(tmp_path / "out.npy"))
    assert done.returncode == 0, done.stderr
    wave = np.load(tmp_path / "out.npy")
    assert wave.dtype == np.float32 and wave.shape == (57600,)
    assert np.abs(wave - golden["mimi.waveform"][0, 0].numpy()).max() <= 1e-4

    encoded = tmp_path / "encoded.npy"
    done = _cli("encode", "--mimi-dir", str(MIMI_DIR), "--audio", str(TINY / "prefix_s1.wav"), "--out",
                str(encoded), "--num-codebooks", "5")
    assert done.returncode == 0, done.stderr
    codes_out = np.load(encoded)
    assert codes_out.dtype == np.int64
    assert np.array_equal(codes_out, golden["mimi.encode.codes"][:5].numpy())


def test_cli_decode_wav_and_errors(tmp_path: Path, golden: dict) -> None:
    sf = pytest.importorskip("soundfile")  # the rest of this file runs on a machine without it
    codes = tmp_path / "codes.npy"
    np.save(codes, golden["mimi.codes"].numpy())  # [1, K, T] is accepted too
    done = _cli("decode", "--mimi-dir", str(MIMI_DIR), "--codes", str(codes), "--out", str(tmp_path / "out.wav"))
    assert done.returncode == 0, done.stderr
    pcm, rate = sf.read(tmp_path / "out.wav", dtype="int16")
    assert rate == 24_000 and pcm.shape == (57600,)
    # The golden waveform through the pcm16 rule, give or take the last bit where 1e-4 crosses a step.
    assert np.abs(pcm.astype(int) - audio.pcm16(golden["mimi.waveform"][0, 0]).astype(int)).max() <= 1

    bad = golden["mimi.codes"][0].numpy().copy()
    bad[0, 0] = 500
    np.save(codes, bad)
    done = _cli("decode", "--mimi-dir", str(MIMI_DIR), "--codes", str(codes), "--out", str(tmp_path / "x.npy"))
    assert done.returncode == 2 and "code 500" in done.stderr and "[0, 128)" in done.stderr


def test_import_does_not_load_transformers() -> None:
    code = ("import sys, dia2_worker.mimi, dia2_worker.mimi.bench, dia2_worker.mimi.__main__, dia2_worker.audio; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'transformers']; assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_bench_runs_on_a_small_shape() -> None:
    config = MimiConfig.load(MIMI_DIR / "config.json")
    result = run("cpu", torch.float32, frames=3, batch_sizes=(1, 2), config=config)
    assert result["shape"] == "custom" and result["machine"]["cpu_cores"] >= 1
    assert result["results"]["offline_ms_per_frame"] > 0
    assert [(s["batch"], s["active_rows"]) for s in result["results"]["streaming"]] == [(1, 1), (2, 2), (2, 1)]
    assert set(random_published_tensors(config)) == set(published_shapes(MimiCodec.skeleton(config))[0])
