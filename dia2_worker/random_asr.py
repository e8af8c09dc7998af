"""A tiny random-weight Whisper in CTranslate2's format, built offline, so the demo and the tests run the real
speech-recognition path (faster-whisper's transcription, CTranslate2's decoding and its word alignment).

Random weights alone would mostly stop at end-of-text, so a few are set by hand instead:

- the encoder marks frames whose log-mel spectrum is not flat: conv1 projects each frame on zero-sum ±1
  patterns (exactly 0 for a flat frame), conv2 sums their rectified magnitudes into one channel pair (0 for
  digital silence and for the padding); its position code is the cos and sin of an angle growing over
  the window;
- one cross-attention head of the decoder attends uniformly to every frame and writes the mean of that
  mark into a "speech" channel; the other head is the alignment head word timestamps are read from: every
  token prefers marked frames, and each word later ones than the word before, so the words spread over
  the sound;
- the decoder's output depends only on the current token (its self-attention and feed-forward write
  nothing): start-of-transcript leads to <|0.00|>, which leads to the first word when the speech channel
  is non-zero, else to end-of-text; each word leads to the next, the last to a closing timestamp, and
  that to end-of-text.

So any non-silent recording of up to 30 s yields three (nonsense) words with timestamps inside the audio,
and digital silence yields none. The weights are drawn from a fixed seed: every bake is byte-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WORDS = ("demo", "voice", "sample")
"""The words the model says, in order."""
SPECIALS = ("<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
            "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>")
TIMESTAMPS = 1501
"""<|0.00|> to <|30.00|> in steps of 0.02 s, right after <|notimestamps|>, as in Whisper."""
N_MELS = 80
D_MODEL = 64
HEADS = 2
FFN = 128
ENCODER_FRAMES = 1500
DECODER_POSITIONS = 448
PATTERNS = 16
"""Zero-sum mel patterns per frame: a non-flat spectrum is orthogonal to all of them with probability 0."""
CONV_GAIN = 1 / 64
"""Keeps a speech frame's flatness measure near the size of its position code, so both survive the norm."""
ALIGN_SPEECH = 2.5
ALIGN_SLOPES = (-8.0, -3.0, 3.0, 8.0)
"""Alignment-head query weights: the preference for speech frames, and for later frames by the row's token
(the alignment rows are the inputs before each word: <|notimestamps|>, then each word but the last)."""
SEED = 0


def byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: byte b -> one printable character (what Whisper's tokenizer uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def vocabulary() -> list[str]:
    """Bytes, the model's words (with the byte-level space), the special tokens, then the timestamps."""
    return [*byte_alphabet(), *(f"Ġ{word}" for word in WORDS), *SPECIALS,
            *(f"<|{i * 0.02:.2f}|>" for i in range(TIMESTAMPS))]


def tokenizer_json(tokens: list[str]) -> str:
    """A byte-level BPE tokenizer over `tokens` (no merges: encoding gives bytes, decoding reads any token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    text_tokens = len(byte_alphabet()) + len(WORDS)
    tokenizer = Tokenizer(models.BPE({token: i for i, token in enumerate(tokens[:text_tokens])}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIALS))
    return tokenizer.to_str()


def build_spec():
    """The CTranslate2 model spec with its weights set (see the module docstring), and its vocabulary."""
    import ctranslate2.specs as specs

    rng = np.random.default_rng(SEED)
    tokens = vocabulary()
    ids = {token: i for i, token in enumerate(tokens)}
    vocab = len(tokens)

    def normal(*shape: int, scale: float = 0.1) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def zeros(*shape: int) -> np.ndarray:
        return np.zeros(shape, np.float32)

    spec = specs.WhisperSpec(1, HEADS, 1, HEADS)
    half = D_MODEL // HEADS

    # Encoder: flatness detector, then a layer that writes nothing back, then the final norm.
    encoder = spec.encoder
    conv1 = zeros(D_MODEL, N_MELS, 3)
    signs = rng.permuted(np.tile(np.repeat([1.0, -1.0], N_MELS // 2), (PATTERNS, 1)), axis=1)
    conv1[:PATTERNS, :, 1] = signs
    conv1[PATTERNS:2 * PATTERNS, :, 1] = -signs
    encoder.conv1.weight, encoder.conv1.bias = conv1, zeros(D_MODEL)
    conv2 = zeros(D_MODEL, D_MODEL, 3)
    conv2[0, : 2 * PATTERNS, 1] = CONV_GAIN
    conv2[1, : 2 * PATTERNS, 1] = -CONV_GAIN
    encoder.conv2.weight, encoder.conv2.bias = conv2, zeros(D_MODEL)
    # Where a frame is, as cos/sin of an angle growing over the window, in channel pairs (zero mean, fixed norm).
    angle = np.arange(ENCODER_FRAMES, dtype=np.float64) / ENCODER_FRAMES * np.pi / 2
    positions = zeros(ENCODER_FRAMES, D_MODEL)
    positions[:, 2], positions[:, 3] = np.cos(angle), -np.cos(angle)
    positions[:, 4], positions[:, 5] = np.sin(angle), -np.sin(angle)
    encoder.position_encodings.encodings = positions
    _set_silent_layer(encoder.layer[0], normal, zeros, cross=False)
    encoder.layer_norm.gamma, encoder.layer_norm.beta = np.ones(D_MODEL, np.float32), zeros(D_MODEL)

    # Decoder: each token's embedding is one class's channel pair; the speech channel pair comes from head 0.
    decoder = spec.decoder
    classes = ["sot", "t0", "other", *WORDS]
    channel = {name: 2 * (i + 1) for i, name in enumerate(classes)}  # channels 0-1: speech
    embeddings = normal(vocab, D_MODEL, scale=0.01)
    embeddings[:, : 2 * (len(classes) + 1)] = 0.0  # the speech and class channels carry nothing else
    token_class = {ids["<|startoftranscript|>"]: "sot", ids["<|0.00|>"]: "t0",
                   **{ids[f"Ġ{word}"]: word for word in WORDS}}
    for token in range(vocab):
        c = channel[token_class.get(token, "other")]
        embeddings[token, c], embeddings[token, c + 1] = 1.0, -1.0
    decoder.embeddings.weight = embeddings
    decoder.position_encodings.encodings = zeros(DECODER_POSITIONS, D_MODEL)
    layer = decoder.layer[0]
    _set_silent_layer(layer, normal, zeros, cross=True)
    query = normal(D_MODEL, D_MODEL)
    query[:half] = 0.0  # head 0: all scores equal, so it averages the encoder frames
    key_value = normal(2 * D_MODEL, D_MODEL)
    key_value[:half] = 0.0
    key_value[D_MODEL:D_MODEL + half] = 0.0
    key_value[D_MODEL, 0] = 1.0  # head 0's first value dimension: the encoder's speech channel
    # Head 1, the alignment head: every token prefers speech frames, and each word a later part of them.
    query[half, :], query[half + 1, :] = 0.0, 0.0
    key_value[half, :], key_value[half + 1, :] = 0.0, 0.0
    key_value[half, 0] = 1.0  # the encoder's speech channel
    key_value[half + 1, 4] = 1.0  # sin of the frame's angle
    for name in classes:
        query[half, channel[name]] = ALIGN_SPEECH
    for name, slope in zip(("other", *WORDS), ALIGN_SLOPES):
        query[half + 1, channel[name]] = slope
    out = zeros(D_MODEL, D_MODEL)
    out[0, 0], out[1, 0] = 1.0, -1.0
    attention = layer.attention
    attention.linear[0].weight, attention.linear[0].bias = query, zeros(D_MODEL)
    attention.linear[1].weight, attention.linear[1].bias = key_value, zeros(2 * D_MODEL)
    attention.linear[2].weight, attention.linear[2].bias = out, zeros(D_MODEL)
    decoder.layer_norm.gamma, decoder.layer_norm.beta = np.ones(D_MODEL, np.float32), zeros(D_MODEL)

    # Next-token logits from the current token's class (and, after <|0.00|>, the speech channel).
    projection = normal(vocab, D_MODEL, scale=0.01)

    def favour(token: int, name: str, weight: float) -> None:
        projection[token, channel[name]] += weight
        projection[token, channel[name] + 1] -= weight

    t0 = ids["<|0.00|>"]
    eot = ids["<|endoftext|>"]
    first = ids[f"Ġ{WORDS[0]}"]
    favour(t0, "sot", 20.0)  # every transcript opens at <|0.00|>
    for name in ("t0", "other", *WORDS):
        favour(t0, name, -10_000.0)
    projection[first, 0] += 10_000.0  # speech: the first word beats end-of-text once the speech channel passes 1e-5
    projection[first, 1] -= 10_000.0
    favour(eot, "t0", 0.1)
    for name in ("sot", "other", *WORDS):
        favour(first, name, -100_000.0)  # the speech channel opens only the first word
    for word, following in zip(WORDS, WORDS[1:]):
        favour(ids[f"Ġ{following}"], word, 20.0)
    for i in range(1, TIMESTAMPS):
        favour(t0 + i, "sot", -20.0)
        favour(t0 + i, WORDS[-1], 20.0 + i * 1e-3)  # closing timestamp: the latest one allowed
    favour(eot, "other", 20.0)
    decoder.projection.weight, decoder.projection.bias = projection, zeros(vocab)

    spec.register_vocabulary(tokens)
    spec.config.suppress_ids = []
    spec.config.suppress_ids_begin = [ids["Ġ"], eot]
    spec.config.lang_ids = []
    spec.config.alignment_heads = [(0, 1)]
    return spec, tokens


def _set_silent_layer(layer, normal, zeros, cross: bool) -> None:
    """Random weights everywhere but the projections back into the residual stream, which are zero."""
    ones = np.ones(D_MODEL, np.float32)
    attention = layer.self_attention
    attention.layer_norm.gamma, attention.layer_norm.beta = ones, zeros(D_MODEL)
    attention.linear[0].weight, attention.linear[0].bias = normal(3 * D_MODEL, D_MODEL), zeros(3 * D_MODEL)
    attention.linear[1].weight, attention.linear[1].bias = zeros(D_MODEL, D_MODEL), zeros(D_MODEL)
    if cross:
        layer.attention.layer_norm.gamma, layer.attention.layer_norm.beta = ones, zeros(D_MODEL)
    ffn = layer.ffn
    ffn.layer_norm.gamma, ffn.layer_norm.beta = ones, zeros(D_MODEL)
    ffn.linear_0.weight, ffn.linear_0.bias = normal(FFN, D_MODEL), zeros(FFN)
    ffn.linear_1.weight, ffn.linear_1.bias = zeros(D_MODEL, FFN), zeros(D_MODEL)


def write_random_asr(out: Path) -> None:
    """The model's files in `out` (created), as faster-whisper loads a converted model directory."""
    spec, tokens = build_spec()
    out.mkdir(parents=True, exist_ok=True)
    spec.validate()
    spec.optimize(quantization=None)
    spec.save(str(out))
    (out / "tokenizer.json").write_text(tokenizer_json(tokens))
    preprocessor = {"feature_size": N_MELS, "sampling_rate": 16000, "hop_length": 160, "chunk_length": 30,
                    "n_fft": 400}
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=1) + "\n")
