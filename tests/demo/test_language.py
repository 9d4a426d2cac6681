"""The demo's language: behaviours, the held-out split and the tokenizer."""

from __future__ import annotations

import random

import llguidance.hf
import pytest

from loraserve.demo.language import (
    ADAPTERS,
    ANSWER,
    BEHAVIOURS,
    BOS,
    DIGITS,
    UNKNOWN,
    build_tokenizer,
    expected_words,
    is_held_out,
    sample_words,
)


def test_each_behaviour_on_an_example():
    words = ["happy", "FOX", "sees", "3", "boats"]
    assert expected_words("base", words) == words
    assert expected_words("upper", words) == ["HAPPY", "FOX", "SEES", "3", "BOATS"]
    assert expected_words("reverse", words) == ["boats", "3", "sees", "FOX", "happy"]
    assert expected_words("digits", words) == ["happy", "FOX", "sees", "three", "boats"]
    assert set(ADAPTERS) == set(BEHAVIOURS) - {"base"}


@pytest.mark.parametrize("held_out", [False, True])
def test_samples_stay_on_their_side_of_the_split(held_out):
    rng = random.Random(7)
    for behaviour in BEHAVIOURS:
        for _ in range(200):
            words = sample_words(rng, behaviour, held_out=held_out)
            assert is_held_out(words) == held_out
            assert len(set(words)) == len(words), "a prompt's words are distinct"
            if behaviour == "digits":
                assert any(w in DIGITS for w in words)


def test_about_one_prompt_in_eight_is_held_out():
    rng = random.Random(3)
    prompts = [
        rng.sample(["cat", "dog", "fox", "owl", "red", "big", "1", "2"], 4) for _ in range(4000)
    ]
    share = sum(is_held_out(p) for p in prompts) / len(prompts)
    assert 0.09 < share < 0.16


def test_a_prompt_encodes_as_bos_words_answer_and_decodes_back():
    tokenizer = build_tokenizer()
    ids = tokenizer.encode("  happy   FOX sees 3 boats ")
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == BOS and tokens[-1] == ANSWER
    assert tokenizer.decode(ids, skip_special_tokens=True) == "happy FOX sees 3 boats"


def test_unknown_words_are_one_unknown_token_each():
    tokenizer = build_tokenizer()
    ids = tokenizer.encode("hello fox")
    assert tokenizer.convert_ids_to_tokens(ids)[1:3] == [UNKNOWN, "\u2581fox"]


def test_the_chat_template_answers_the_last_user_message():
    tokenizer = build_tokenizer()
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "red fox"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    assert ids == tokenizer.encode("red fox")


def test_constrained_decoding_can_read_the_tokenizer():
    """llguidance needs each token's text on its own (it refuses plain word-level decoders)."""
    assert llguidance.hf.from_tokenizer(build_tokenizer()) is not None
