"""The demo's small language: its words, its tokenizer, and the behaviour each demo model shows.

A prompt is a few distinct words from `WORDS` (any may be written in upper case) and digits.
The demo base repeats them; each demo adapter has learned one change that is easy to check by
eye (`BEHAVIOURS`). `expected_words` is the oracle that training, its self-check and the tests
share. A stable hash splits all prompts into the ones training may use and the held-out ones
that only checks see (`is_held_out`), so a check always runs on prompts training never saw.

Knows nothing about models or training: it only describes the language.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

# fmt: off
NOUNS = (
    "cat", "dog", "fox", "owl", "bee", "cow", "hen", "pig", "bird", "fish", "king", "queen",
    "boat", "ship", "house", "tree", "river", "stone", "cloud", "moon", "sun", "star", "road",
    "door", "lamp", "book", "hat", "apple", "bread", "milk", "tea", "cake", "cats", "dogs",
    "foxes", "birds", "boats", "stars", "apples", "books",
)
ADJECTIVES = (
    "red", "blue", "green", "gold", "pink", "gray", "big", "small", "old", "new", "fast", "slow",
    "happy", "sad",
)
VERBS = ("runs", "jumps", "sings", "eats", "sleeps", "sees", "likes", "finds", "has")
NUMBER_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# fmt: on
DIGITS = tuple(str(i) for i in range(10))
WORDS = (*NOUNS, *ADJECTIVES, *VERBS, *NUMBER_NAMES)

PAD, BOS, EOS, UNKNOWN, ANSWER = "<pad>", "<s>", "</s>", "<unk>", "=>"
SPACE = "\u2581"  # a word's leading space inside its token
SPECIAL_TOKENS = (PAD, BOS, EOS, UNKNOWN, ANSWER)
VOCABULARY = (*SPECIAL_TOKENS, *WORDS, *(w.upper() for w in WORDS), *DIGITS)
TOKEN_ID = {token: i for i, token in enumerate(VOCABULARY)}
# The chat template answers the user messages' words as one prompt (a system message is left out).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ message['content'] }} {% endif %}{% endfor %}" + ANSWER
)

MIN_WORDS, MAX_WORDS = 2, 10
UPPER_CASE_SHARE = 0.25
HELD_OUT_BUCKETS = 8  # one prompt in this many is held out of training


def _spell_digits(words: Sequence[str]) -> list[str]:
    return [NUMBER_NAMES[int(w)] if w in DIGITS else w for w in words]


@dataclass(frozen=True)
class Behaviour:
    answer: Callable[[Sequence[str]], list[str]]  # a prompt's words -> the answer's
    description: str


# The base's behaviour is "base"; the others are the demo adapters', by name.
BEHAVIOURS = {
    "base": Behaviour(list, "repeats the words"),
    "upper": Behaviour(lambda words: [w.upper() for w in words], "repeats them in upper case"),
    "reverse": Behaviour(lambda words: list(reversed(words)), "repeats them in reverse order"),
    "digits": Behaviour(_spell_digits, "repeats them with digits spelled out"),
}
ADAPTERS = tuple(name for name in BEHAVIOURS if name != "base")


def expected_words(behaviour: str, words: Sequence[str]) -> list[str]:
    """What the model with this behaviour answers to `words`."""
    return BEHAVIOURS[behaviour].answer(words)


def is_held_out(words: Sequence[str]) -> bool:
    """Whether a prompt belongs to the checks only (training never samples it)."""
    return zlib.crc32(" ".join(words).encode()) % HELD_OUT_BUCKETS == 0


def sample_words(rng: random.Random, behaviour: str, *, held_out: bool) -> list[str]:
    """A random prompt on one side of the held-out split, with a digit in it for "digits"."""
    while True:
        words = rng.sample((*WORDS, *DIGITS), rng.randint(MIN_WORDS, MAX_WORDS))
        words = [w.upper() if rng.random() < UPPER_CASE_SHARE else w for w in words]
        if behaviour == "digits" and not any(w in DIGITS for w in words):
            words[rng.randrange(len(words))] = rng.choice([d for d in DIGITS if d not in words])
        if is_held_out(words) == held_out:
            return words


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per word of the vocabulary, split on whitespace; the prompt `a b` encodes as
    `<s> a b =>`, so the model answers right after it. Words outside the vocabulary are <unk>.

    Tokens carry their leading space as `▁` (as Llama's and Mistral's do), so the text of any
    run of tokens is known on its own, which constrained decoding needs."""
    vocabulary = {
        token if token in SPECIAL_TOKENS else SPACE + token: i for token, i in TOKEN_ID.items()
    }
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token=UNKNOWN))
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.Strip(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Prepend(SPACE),
            normalizers.Replace(" ", SPACE),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Split(SPACE, behavior="merged_with_next")
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace(SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {ANSWER}",
        special_tokens=[(BOS, TOKEN_ID[BOS]), (ANSWER, TOKEN_ID[ANSWER])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNKNOWN,
        additional_special_tokens=[ANSWER],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
