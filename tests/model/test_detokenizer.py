"""Tests for incremental detokenization: multi-byte safety, stop sequences, window size.

The tokenizer is a byte-level BPE trained here on a tiny corpus, so accented letters, CJK and
emoji are split across several tokens, some of which decode to half a character.
"""

from __future__ import annotations

from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from loraserve.model.detokenizer import IncrementalDetokenizer

CORPUS = [
    "Hello world, this is a small corpus for testing the detokenizer.",
    "café crème brûlée, naïve façade, Ünïcödé",
    "日本語のテキストです。中文字符测试。",
    "emoji 😀🎉👍🏽 party 🎉🎉 done",
]
BROKEN = "\ufffd"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")


def _ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _push_all(detok: IncrementalDetokenizer, ids: list[int]) -> tuple[list[str], bool]:
    """Push ids until a stop hits; return the deltas and whether one hit."""
    deltas = []
    for token_id in ids:
        delta, hit = detok.push(token_id)
        deltas.append(delta)
        if hit:
            return deltas, True
    return deltas, False


@pytest.mark.parametrize("prompt", ["", "Prompt: ", "前置き 😀"])
@pytest.mark.parametrize(
    "text",
    [
        "naïve 😀 日本語 hello",
        "🎉🎉👍🏽 café crème",
        "日本語のテキスト。",
        "plain ascii, nothing special",
        "Ünïcödé 中文 👍🏽",
    ],
)
def test_deltas_reassemble_the_decoded_text(
    tokenizer: PreTrainedTokenizerFast, prompt: str, text: str
) -> None:
    ids = _ids(tokenizer, text)
    if not text.isascii():
        assert any(BROKEN in tokenizer.decode([i]) for i in ids), "no character is split"
    detok = IncrementalDetokenizer(tokenizer, _ids(tokenizer, prompt))
    deltas, hit = _push_all(detok, ids)
    deltas.append(detok.flush())
    assert not hit
    assert not any(BROKEN in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert detok.text == text


def test_special_tokens_add_no_text(tokenizer: PreTrainedTokenizerFast) -> None:
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas, _ = _push_all(detok, [*_ids(tokenizer, "café"), tokenizer.eos_token_id])
    assert deltas[-1] == ""
    assert "".join(deltas) + detok.flush() == "café"


def test_decode_window_does_not_grow_with_the_sequence(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    class RecordingTokenizer:
        def __init__(self) -> None:
            self.longest = 0

        def decode(self, ids: list[int], **kwargs: Any) -> str:
            self.longest = max(self.longest, len(ids))
            return tokenizer.decode(ids, **kwargs)

    recording = RecordingTokenizer()
    text = " ".join(CORPUS * 4)
    ids = _ids(tokenizer, text)
    assert len(ids) > 300
    detok = IncrementalDetokenizer(recording, _ids(tokenizer, text), stop=("never",))  # type: ignore[arg-type]
    deltas, _ = _push_all(detok, ids)
    assert "".join(deltas) + detok.flush() == text
    assert recording.longest <= 12


@pytest.mark.parametrize(
    ("text", "stop", "before"),
    [
        ("Hello world STOP more text", ("STOP",), "Hello world "),
        ("STOP right away", ("STOP",), ""),
        ("naïve 😀 日本語 hello", ("😀 日",), "naïve "),
        ("café crème brûlée", ("ème b", "crème"), "café "),
        ("abc xyz def", ("def", "xyz"), "abc "),
        ("party 🎉🎉 done", ("🎉 d", "🎉🎉 do"), "party "),
    ],
)
def test_stop_sequence_split_across_tokens_is_caught_and_excluded(
    tokenizer: PreTrainedTokenizerFast, text: str, stop: tuple[str, ...], before: str
) -> None:
    ids = _ids(tokenizer, text)
    assert not any(s in tokenizer.decode([i]) for s in stop for i in ids), "stop not split"
    detok = IncrementalDetokenizer(tokenizer, _ids(tokenizer, "Q: "), stop=stop)
    deltas, hit = _push_all(detok, ids)
    assert hit
    assert "".join(deltas) == detok.text == before
    assert not any(BROKEN in d for d in deltas)
    assert detok.flush() == ""
    assert detok.push(ids[-1]) == ("", True)


@pytest.mark.parametrize(
    ("text", "stop", "emitted", "held"),
    [
        ("answer: ST", ("STOP",), "answer: ", "ST"),
        ("answer: STOx", ("STOP",), "answer: STOx", ""),
        ("see 日本", ("日本語",), "see ", "日本"),
        ("the end", ("end.", "d!"), "the ", "end"),
        ("no stops here", (), "no stops here", ""),
    ],
)
def test_flush_returns_held_back_text(
    tokenizer: PreTrainedTokenizerFast, text: str, stop: tuple[str, ...], emitted: str, held: str
) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], stop=stop)
    deltas, hit = _push_all(detok, _ids(tokenizer, text))
    assert not hit
    assert "".join(deltas) == detok.text == emitted
    assert detok.flush() == held
    assert detok.text == text
    assert detok.flush() == ""


def test_flush_releases_an_incomplete_character(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = _ids(tokenizer, "ok 😀")[:-1]
    truncated = tokenizer.decode(ids, skip_special_tokens=True)
    assert truncated.endswith(BROKEN)
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas, _ = _push_all(detok, ids)
    assert "".join(deltas) == "ok "
    assert detok.flush() == truncated[len("ok ") :]
