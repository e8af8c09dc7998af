"""Text side of Dia2: tokenizer glue, script parsing into word entries, and the text state machine.

The state machine turns the action head's "new word" / "pad" decisions into the two text streams a frame
reads. It runs on tensors with a batch dimension (one row per generation, everything on the model's
device) so a whole frame, text included, can be one CUDA graph and many generations can share a step.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import torch

MAX_PADDING = 6
FRAME_RATE = 12.5
_BREAK = re.compile(r'<break\s+time="(\d+(?:\.\d*)?)s"\s*/?>')


@dataclass(frozen=True)
class TokenIds:
    new_word: int
    pad: int
    zero: int
    bos: int
    spk1: int
    spk2: int


class Dia2Tokenizer:
    """Byte-level BPE from tokenizer.json through the `tokenizers` library (no special tokens added)."""

    def __init__(self, tokenizer, bos: int, spk1: int | None, spk2: int | None) -> None:
        self._tokenizer = tokenizer
        self.bos, self.spk1, self.spk2 = bos, spk1, spk2

    @classmethod
    def from_dir(cls, directory: str | Path) -> "Dia2Tokenizer":
        from tokenizers import Tokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        tokenizer = Tokenizer.from_file(str(path))
        bos_id = None
        bos_token = _bos_token(directory)
        if bos_token is not None:
            bos_id = tokenizer.token_to_id(bos_token)
        return cls(tokenizer, bos_id or 1, tokenizer.token_to_id("[S1]"), tokenizer.token_to_id("[S2]"))

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def token_ids(self, new_word: int, pad: int, zero: int) -> TokenIds:
        """Speaker tags missing from the vocabulary fall back to the new-word id, as the original does."""
        return TokenIds(new_word=new_word, pad=pad, zero=zero, bos=self.bos,
                        spk1=new_word if self.spk1 is None else self.spk1,
                        spk2=new_word if self.spk2 is None else self.spk2)


def _bos_token(directory: Path) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        if path.is_file():
            token = json.loads(path.read_text()).get("bos_token")
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str):
                return token
    return None


@dataclass(frozen=True)
class Entry:
    """A word (tokens, its text) or a pause (no tokens); `padding` frames are forced after it."""

    tokens: tuple[int, ...]
    text: str
    padding: int


def normalize_script(script: str | Sequence[str]) -> str:
    return (script if isinstance(script, str) else "\n".join(script)).strip()


def parse_script(script: str, tokenizer: Dia2Tokenizer, ids: TokenIds) -> list[Entry]:
    """[S1]/[S2] tags, words and <break time="Xs"/> pauses -> entries (the spec's script parsing)."""
    entries: list[Entry] = []
    pending_speaker: str | None = None
    first_word = True
    text = normalize_script(script).replace("\u2019", "'").replace(":", " ")
    position = 0
    for match in [*_BREAK.finditer(text), None]:
        segment = text[position: match.start() if match else len(text)]
        for word in segment.split():
            if word in ("[S1]", "[S2]"):
                pending_speaker = word
                continue
            tokens = tokenizer.encode(f"{pending_speaker} {word}" if pending_speaker else word)
            if first_word and (not tokens or tokens[0] != ids.spk1):
                tokens.insert(0, ids.spk1)
            first_word = False
            pending_speaker = None
            entries.append(Entry(tuple(tokens), word, len(tokens)))
        if match is not None:
            padding = round(float(match.group(1)) * FRAME_RATE)
            if padding > 0:
                entries.append(Entry((), "", padding))
            position = match.end()
    return entries


def prefix_entries(words: Sequence[tuple[str, float, float]], tokenizer: Dia2Tokenizer,
                   speaker_tag: str) -> tuple[list[Entry], list[int]]:
    """Timed words of one prefix speaker -> entries and the frame before each word (its new-word step)."""
    entries, steps = [], []
    previous_end = 0
    for i, (word, start, end) in enumerate(words):
        tokens = tokenizer.encode(f"{speaker_tag} {word}" if i == 0 else word)
        start_frame = max(previous_end + 1, round(start * FRAME_RATE))
        end_frame = start_frame + len(tokens)
        next_start = round((words[i + 1][1] if i + 1 < len(words) else end) * FRAME_RATE)
        next_start = max(end_frame + 1, next_start)
        entries.append(Entry(tuple(tokens), word, max(0, next_start - start_frame - 1)))
        steps.append(start_frame - 1)
        previous_end = end_frame
    return entries, steps


@dataclass
class TextState:
    """The text state machine of B generations, as device tensors.

    Each row's words are laid out once: `flat` holds the tokens of all entries that have tokens, in order,
    and every entry knows where its tokens start and end in it. The queues of the original (pending tokens
    of the current word, lookahead tokens of a word further on) are then just [pos, end) windows of `flat`,
    because tokens are only ever appended in entry order.
    """

    flat: torch.Tensor            # [B, N] tokens of all words
    entry_start: torch.Tensor     # [B, E] where each entry's tokens start in `flat`
    entry_len: torch.Tensor       # [B, E] number of tokens (0 for a pause)
    entry_padding: torch.Tensor   # [B, E] frames forced to pad after the entry
    entry_lookahead: torch.Tensor  # [B, E] end of the lookahead window after popping it (-1: unchanged)
    num_entries: torch.Tensor     # [B]
    next_entry: torch.Tensor      # [B] entries popped so far
    word_step: torch.Tensor       # [B, E] frame at which each word was consumed (-1: not yet)
    pending_pos: torch.Tensor     # [B] the current word's tokens still to emit: flat[pending_pos:pending_end]
    pending_end: torch.Tensor
    look_pos: torch.Tensor        # [B] second-stream lookahead tokens: flat[look_pos:look_end]
    look_end: torch.Tensor
    padding_budget: torch.Tensor  # [B]
    forced_padding: torch.Tensor  # [B]
    end_step: torch.Tensor        # [B] frame where the script ran out (-1: not yet)

    @classmethod
    def allocate(cls, batch: int, max_entries: int, max_tokens: int, device: torch.device) -> "TextState":
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=device)

        return cls(zeros(batch, max_tokens), zeros(batch, max_entries), zeros(batch, max_entries),
                   zeros(batch, max_entries), zeros(batch, max_entries), zeros(batch), zeros(batch),
                   zeros(batch, max_entries), zeros(batch), zeros(batch), zeros(batch), zeros(batch),
                   zeros(batch), zeros(batch), zeros(batch))

    def rows(self, rows: slice) -> "TextState":
        """A view of some rows: stepping it updates those rows of this state and no others."""
        return TextState(*(getattr(self, f.name)[rows] for f in fields(self)))

    def copy_row(self, row: int, source: "TextState") -> None:
        """Row 0 of `source` (a state built on the host, possibly smaller) into `row` of this one."""
        max_entries, max_tokens = self.capacity
        entries, tokens = source.capacity
        if entries > max_entries or tokens > max_tokens:
            raise ValueError(f"a script of {entries} entries / {tokens} tokens exceeds the text state's "
                             f"capacity of {max_entries} entries / {max_tokens} tokens")
        for f in fields(self):
            target, value = getattr(self, f.name)[row], getattr(source, f.name)[0]
            if target.dim():
                target.fill_(-1 if f.name == "word_step" else 0)
                target[: value.shape[0]] = value
            else:
                target.copy_(value)

    @property
    def capacity(self) -> tuple[int, int]:
        """(max entries, max tokens) a row can hold."""
        return self.entry_start.shape[1], self.flat.shape[1]

    def load_row(self, row: int, entries: Sequence[Entry], initial_padding: int, ahead: int) -> None:
        """Put a new generation's entries in `row` and reset its machine state."""
        max_entries, max_tokens = self.capacity
        total = sum(len(e.tokens) for e in entries)
        if len(entries) > max_entries or total > max_tokens:
            raise ValueError(f"script of {len(entries)} entries / {total} tokens exceeds the text state's "
                             f"capacity of {max_entries} entries / {max_tokens} tokens")
        starts, lengths, word_ends, flat = [], [], [], []
        for entry in entries:
            starts.append(len(flat))
            lengths.append(len(entry.tokens))
            flat.extend(entry.tokens)
            if entry.tokens:
                word_ends.append(len(flat))
        # After popping the j-th word, the lookahead grows to the end of word j + ahead.
        lookahead, j = [], 0
        for entry in entries:
            if entry.tokens:
                lookahead.append(word_ends[j + ahead] if ahead and j + ahead < len(word_ends) else -1)
                j += 1
            else:
                lookahead.append(-1)
        look_start = word_ends[ahead - 1] if ahead and ahead - 1 < len(word_ends) else total
        n = len(entries)
        for name, values in (("flat", flat), ("entry_start", starts), ("entry_len", lengths),
                             ("entry_padding", [e.padding for e in entries]), ("entry_lookahead", lookahead)):
            tensor = getattr(self, name)[row]
            tensor.zero_()
            tensor[: len(values)] = torch.tensor(values, dtype=torch.long)
        self.word_step[row] = -1
        for name, value in (("num_entries", n), ("next_entry", 0), ("pending_pos", 0), ("pending_end", 0),
                            ("look_pos", look_start), ("look_end", look_start),
                            ("padding_budget", initial_padding), ("forced_padding", initial_padding),
                            ("end_step", -1)):
            getattr(self, name)[row] = value


def text_step(state: TextState, step: torch.Tensor, token: torch.Tensor, forced: torch.Tensor, ids: TokenIds,
              ahead: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One frame of the state machine for every row: token (action id or text id) -> (main, second, the entry
    consumed as a word this frame or -1).

    `forced` rows keep their token (prefix warm-up). Updates `state` in place, without host syncs.
    """
    s = state
    nw, pad = ids.new_word, ids.pad
    # 1. sanitize: action 1 -> new word, action 0 -> pad, anything else that is not one of them -> pad
    token = torch.where(token == 1, nw, torch.where(token == 0, pad, token))
    token = torch.where((token == nw) | (token == pad), token, pad)
    # 2. constrain
    has_pending = s.pending_pos < s.pending_end
    constrained = torch.where(s.forced_padding > 0, pad,
                              torch.where((s.padding_budget <= 0) & (token != nw), nw, token))
    token = torch.where(has_pending, pad, torch.where(forced, token, constrained))
    # 3. a new word pops the next entry, or marks the end of the script
    is_nw = token == nw
    can_pop = is_nw & (s.next_entry < s.num_entries)
    entry = s.next_entry.clamp(max=s.entry_len.shape[1] - 1).unsqueeze(1)
    e_len, e_start = s.entry_len.gather(1, entry)[:, 0], s.entry_start.gather(1, entry)[:, 0]
    is_word = can_pop & (e_len > 0)
    s.word_step.scatter_(1, entry, torch.where(is_word, step, s.word_step.gather(1, entry)[:, 0]).unsqueeze(1))
    s.pending_pos.copy_(torch.where(is_word, e_start, s.pending_pos))
    s.pending_end.copy_(torch.where(is_word, e_start + e_len, s.pending_end))
    if ahead:
        e_look = s.entry_lookahead.gather(1, entry)[:, 0]
        s.look_end.copy_(torch.where(is_word & (e_look >= 0), e_look, s.look_end))
    s.padding_budget.copy_(torch.where(is_word, MAX_PADDING, s.padding_budget))
    s.forced_padding.copy_(torch.where(can_pop, s.entry_padding.gather(1, entry)[:, 0], s.forced_padding))
    s.next_entry.add_(can_pop.long())
    exhausted = is_nw & ~can_pop
    end_unset = s.end_step < 0
    token = torch.where(can_pop & ~is_word, pad, token)
    token = torch.where(exhausted, torch.where(end_unset, nw if ahead else pad, pad), token)
    s.end_step.copy_(torch.where(exhausted & end_unset, step, s.end_step))
    # 4. output: a pad emits the next pending token of the current word
    is_pad = token == pad
    s.padding_budget.sub_((is_pad & (s.padding_budget > 0)).long())
    s.forced_padding.sub_((is_pad & (s.forced_padding > 0)).long())
    out = torch.where(is_pad, _pop(s.flat, s.pending_pos, s.pending_end, pad, is_pad), token)
    word = torch.where(is_word, entry[:, 0], -1)
    if not ahead:
        return out, out, word
    # 5. second stream: a new word moves to it and the main stream carries the word's first token
    out_nw = out == nw
    main = torch.where(out_nw, _pop(s.flat, s.pending_pos, s.pending_end, pad, out_nw), out)
    second = torch.where(out_nw, nw, _pop(s.flat, s.look_pos, s.look_end, pad, ~out_nw))
    return main, second, word


def _pop(flat: torch.Tensor, pos: torch.Tensor, end: torch.Tensor, empty: int, when: torch.Tensor) -> torch.Tensor:
    """Head of the flat[pos:end) queue (or `empty`); pos advances where `when` holds and the queue is non-empty."""
    available = pos < end
    head = flat.gather(1, pos.clamp(max=flat.shape[1] - 1).unsqueeze(1))[:, 0]
    pos.add_((available & when).long())
    return torch.where(available, head, empty)
