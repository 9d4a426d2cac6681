"""PEFT's per-module pattern keys (`rank_pattern`, `alpha_pattern`), matched with RE2.

PEFT gives a module the value of the first key, in the config's order, for which
`re.match(rf"(.*\\.)?({key})$", module_path)` succeeds (`peft.utils.other.get_pattern_key`), and
the config's default when none does. We build the same expression around each key but compile
it with RE2, whose matching time is linear in the path and which never backtracks, so a
tenant's key cannot stall the server; Python's `re` never sees a key. On module paths (ASCII,
no newline) the two engines agree on every expression both accept. A key RE2 cannot compile
(backreferences, look-around, huge repetition counts, a program over `MAX_PROGRAM_BYTES`) is
refused with RE2's reason. One divergence remains: an inline global flag inside a key, such as
`(?i)q_proj`, which Python's `re` refuses in that position, applies to the key alone in RE2.

Knows nothing about tensors or files: it maps module paths to values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import re2

from loraserve.types import clip, shown

MAX_KEYS = 1024  # per pattern mapping: one key per module of a 70B model's LoRA fits
MAX_KEY_CHARS = 256
MAX_PROGRAM_BYTES = 1 << 20  # RE2's memory budget for one compiled key

T = TypeVar("T")


def _options() -> re2.Options:
    options = re2.Options()
    options.max_mem = MAX_PROGRAM_BYTES
    options.log_errors = False  # a refused key is reported to its tenant, not logged
    options.never_capture = True  # only whether it matches counts
    return options


_OPTIONS = _options()


@dataclass(frozen=True)
class PatternKey(Generic[T]):
    key: str  # as the config spells it
    regex: re2._Regexp  # rf"(.*\.)?({key})$", compiled by RE2
    value: T


@dataclass(frozen=True)
class PatternTable(Generic[T]):
    """The compiled keys of one pattern mapping, in the config's order."""

    keys: tuple[PatternKey[T], ...] = ()

    def value(self, module: str, default: T) -> T:
        """The value of the first key matching `module` (PEFT's rule), else `default`."""
        for entry in self.keys:
            if entry.regex.match(module) is not None:
                return entry.value
        return default


def compile_patterns(field: str, patterns: Mapping[str, T], problems: list[str]) -> PatternTable[T]:
    """Compile every key of `patterns` with RE2; each one that fails adds a problem naming it.

    `patterns` must already respect MAX_KEYS and MAX_KEY_CHARS (the config schema checks both).
    """
    keys = []
    for key, value in patterns.items():
        try:
            regex = re2.compile(rf"(.*\.)?({key})$", _OPTIONS)
        except re2.error as error:
            reason = error.args[0] if error.args else "cannot be compiled"
            if isinstance(reason, bytes):
                reason = reason.decode("utf-8", "replace")
            problems.append(
                f"{field}: key {shown(key)} is refused by RE2 ({clip(reason, 80)}); use module "
                "names or RE2 syntax (no backreferences, no look-around)"
            )
            continue
        keys.append(PatternKey(key, regex, value))
    return PatternTable(tuple(keys))
