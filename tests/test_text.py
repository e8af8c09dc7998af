"""Script parsing, prefix word entries and the batched tensor state machine (against a plain-Python oracle)."""

from __future__ import annotations

import random
from collections import deque

import pytest
import torch

from dia2_worker.text import (MAX_PADDING, Dia2Tokenizer, Entry, TextState, TokenIds, parse_script,
                              prefix_entries, text_step)

IDS = TokenIds(new_word=7, pad=0, zero=6, bos=1, spk1=4, spk2=5)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir) -> Dia2Tokenizer:
    return Dia2Tokenizer.from_dir(tiny_dir)


def test_tokenizer_special_ids(tokenizer):
    assert (tokenizer.bos, tokenizer.spk1, tokenizer.spk2) == (1, 4, 5)
    assert tokenizer.encode("[S1] hello") == [4, 228, 265, 295]


def test_tokenizer_bos_fallback_and_missing_speaker_tags(tmp_path, tiny_dir):
    tok = Dia2Tokenizer.from_dir(tiny_dir)
    (tmp_path / "tokenizer.json").write_text((tiny_dir / "tokenizer.json").read_text())
    bare = Dia2Tokenizer.from_dir(tmp_path)  # no tokenizer_config.json: BOS falls back to 1
    assert bare.bos == 1
    stripped = Dia2Tokenizer(tok._tokenizer, 1, None, None)
    ids = stripped.token_ids(new_word=7, pad=0, zero=6)
    assert (ids.spk1, ids.spk2) == (7, 7)


def test_parse_script_rules(tokenizer):
    ids = tokenizer.token_ids(new_word=7, pad=0, zero=6)
    entries = parse_script('[S2] hi:there <break time="0.5s"/> [S1] <break time="1.04s"/> ok ’yes’ '
                           '<break time="0s"/> [S2]', tokenizer, ids)
    texts = [e.text for e in entries]
    assert texts == ["hi", "there", "", "", "ok", "'yes'"]
    # the first word gets [S1] in front of its [S2] tag; padding = number of tokens
    assert entries[0].tokens[:2] == (4, 5) and entries[0].padding == len(entries[0].tokens)
    # breaks: round-half-even of seconds * 12.5 (0.5 s -> 6, 1.04 s -> 13), 0 s adds nothing
    assert [e.padding for e in entries if not e.tokens] == [6, 13]
    # a pending tag survives a break and applies to the next word; a trailing tag is dropped
    assert entries[4].tokens == tuple(tokenizer.encode("[S1] ok"))
    assert entries[5].tokens == tuple(tokenizer.encode("'yes'"))


def test_parse_script_first_word_keeps_its_s1(tokenizer):
    ids = tokenizer.token_ids(new_word=7, pad=0, zero=6)
    entries = parse_script(["[S1] hello", "world"], tokenizer, ids)
    assert entries[0].tokens == tuple(tokenizer.encode("[S1] hello"))
    assert [e.text for e in entries] == ["hello", "world"]


def test_prefix_entries_timing(tokenizer):
    words = [("hello", 0.1, 0.4), ("there", 0.5, 0.9), ("friend", 1.0, 1.6)]
    entries, steps = prefix_entries(words, tokenizer, "[S1]")
    assert [e.tokens for e in entries] == [(4, 228, 265, 295), tuple(tokenizer.encode("there")),
                                           tuple(tokenizer.encode("friend"))]
    assert [len(e.tokens) for e in entries] == [4, 2, 6]
    # Worked by hand from the original runtime's words_to_entries (12.5 frames/s, Python's rounding):
    # hello: starts at frame max(0 + 1, round(1.25)) = 1, its 4 tokens end at 5; there starts at
    #   max(5 + 1, round(6.25)) = 6, so hello pads 6 - 1 - 1 = 4 frames;
    # there: 2 tokens end at 8; friend starts at max(8 + 1, round(12.5) = 12) = 12: padding 12 - 6 - 1 = 5;
    # friend: 6 tokens end at 18; the speech ends at max(18 + 1, round(20.0)) = 20: padding 20 - 12 - 1 = 7.
    assert steps == [0, 5, 11]  # the frame before each word's start
    assert [e.padding for e in entries] == [4, 5, 7]


class OracleMachine:
    """The spec's state machine, written as plainly as possible, for one generation."""

    def __init__(self, entries: list[Entry], initial_padding: int, ahead: int) -> None:
        self.entries = deque(entries)
        self.budget = self.forced = initial_padding
        self.pending: deque[int] = deque()
        self.lookahead: deque[int] = deque()
        self.end_step: int | None = None
        self.transcript: list[tuple[str, int]] = []
        self.ahead = ahead

    def process(self, step: int, token: int, forced: bool) -> tuple[int, int]:
        nw, pad = IDS.new_word, IDS.pad
        token = nw if token == 1 else pad if token == 0 else token
        if token not in (nw, pad):
            token = pad
        if self.pending:
            token = pad
        elif not forced:
            if self.forced > 0:
                token = pad
            elif self.budget <= 0 and token != nw:
                token = nw
        if token == nw:
            if self.entries:
                entry = self.entries.popleft()
                if entry.tokens:
                    self.transcript.append((entry.text, step))
                    self.pending.extend(entry.tokens)
                    if self.ahead:
                        with_tokens = [e for e in self.entries if e.tokens]
                        if len(with_tokens) >= self.ahead:
                            self.lookahead.extend(with_tokens[self.ahead - 1].tokens)
                    self.budget = MAX_PADDING
                else:
                    token = pad
                self.forced = entry.padding
            else:
                token = nw if self.ahead and self.end_step is None else pad
                if self.end_step is None:
                    self.end_step = step
        if token == pad:
            if self.budget > 0:
                self.budget -= 1
            if self.forced > 0:
                self.forced -= 1
            out = self.pending.popleft() if self.pending else pad
        else:
            out = token
        if not self.ahead:
            return out, out
        if out == nw:
            return (self.pending.popleft() if self.pending else pad), nw
        return out, (self.lookahead.popleft() if self.lookahead else pad)


def random_entries(rng: random.Random) -> list[Entry]:
    entries = []
    for i in range(rng.randint(1, 12)):
        if rng.random() < 0.2:
            entries.append(Entry((), "", rng.randint(1, 9)))
        else:
            tokens = tuple(rng.randint(10, 300) for _ in range(rng.randint(1, 8)))
            entries.append(Entry(tokens, f"w{i}", len(tokens)))
    return entries


@pytest.mark.parametrize("ahead", [0, 1, 2, 3])
def test_tensor_state_machine_matches_oracle(ahead):
    rng = random.Random(ahead)
    batch, steps = 6, 160
    scripts = [random_entries(rng) for _ in range(batch)]
    paddings = [rng.randint(0, 3) for _ in range(batch)]
    state = TextState.allocate(batch, 16, 128, torch.device("cpu"))
    oracles = []
    for row, (entries, padding) in enumerate(zip(scripts, paddings)):
        state.load_row(row, entries, padding, ahead)
        oracles.append(OracleMachine(entries, padding, ahead))
    for step in range(steps):
        tokens = [rng.choice([0, 1, 1, 2, IDS.new_word, IDS.pad]) for _ in range(batch)]
        forced = [rng.random() < 0.15 for _ in range(batch)]
        words_before = [len(o.transcript) for o in oracles]
        main, second, word = text_step(state, torch.full((batch,), step), torch.tensor(tokens),
                                       torch.tensor(forced), IDS, ahead)
        expected = [o.process(step, tok, f) for o, tok, f in zip(oracles, tokens, forced)]
        assert list(zip(main.tolist(), second.tolist())) == expected, f"step {step}"
        consumed = [o.transcript[-1][0] if len(o.transcript) > n else None for o, n in zip(oracles, words_before)]
        assert [scripts[r][e].text if e >= 0 else None for r, e in enumerate(word.tolist())] == consumed
    for row, oracle in enumerate(oracles):
        assert int(state.end_step[row]) == (-1 if oracle.end_step is None else oracle.end_step)
        steps_taken = state.word_step[row].tolist()
        transcript = [(e.text, steps_taken[i]) for i, e in enumerate(scripts[row]) if e.tokens and steps_taken[i] >= 0]
        assert transcript == oracle.transcript


def test_one_row_view_leaves_other_rows_alone():
    state = TextState.allocate(3, 4, 16, torch.device("cpu"))
    entries = [Entry((11, 12), "a", 2), Entry((13,), "b", 1)]
    for row in range(3):
        state.load_row(row, entries, 0, 2)
    before = {name: getattr(state, name).clone() for name in ("next_entry", "pending_pos", "look_pos")}
    text_step(state.rows(slice(1, 2)), torch.tensor([0]), torch.tensor([1]), torch.tensor([False]), IDS, 2)
    assert int(state.next_entry[1]) == 1
    for name, old in before.items():
        new = getattr(state, name)
        assert torch.equal(new[[0, 2]], old[[0, 2]])


def test_load_row_rejects_scripts_over_capacity():
    state = TextState.allocate(1, 2, 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="capacity"):
        state.load_row(0, [Entry((1, 2, 3), "a", 3), Entry((4, 5), "b", 2)], 0, 0)


def test_copy_row_matches_loading_in_place():
    entries = [Entry((11, 12), "a", 2), Entry((), "", 3), Entry((13,), "b", 1), Entry((14, 15, 16), "c", 3)]
    small = TextState.allocate(1, len(entries), 6, torch.device("cpu"))
    small.load_row(0, entries, 1, 2)
    text_step(small, torch.tensor([0]), torch.tensor([7]), torch.tensor([True]), IDS, 2)  # advance it a little
    big, expected = (TextState.allocate(3, 8, 16, torch.device("cpu")) for _ in range(2))
    big.load_row(1, [Entry((1,), "x", 1)] * 5, 0, 0)  # stale content the copy must clear
    expected.load_row(1, entries, 1, 2)
    text_step(expected.rows(slice(1, 2)), torch.tensor([0]), torch.tensor([7]), torch.tensor([True]), IDS, 2)
    big.copy_row(1, small)
    for name in ("flat", "entry_start", "entry_len", "entry_padding", "entry_lookahead", "word_step", "num_entries",
                 "next_entry", "pending_pos", "pending_end", "look_pos", "look_end", "padding_budget",
                 "forced_padding", "end_step"):
        assert torch.equal(getattr(big, name)[1], getattr(expected, name)[1]), name
    with pytest.raises(ValueError, match="capacity"):
        TextState.allocate(1, 2, 4, torch.device("cpu")).copy_row(0, big)
