"""The operator's pages stay true to the code: docs/troubleshooting.md quotes only messages the
sources send, with the status they are sent with; docs/operations.md names only real
settings, flags and variables; both name only metrics the server exports.

Messages are read from the sources' syntax trees: each string literal and f-string is a
template, its formatted parts shown as `…` (or as the value of the module-level constant they
name), and tagged with the status its call sends (an error class of `api/errors.py`'s table, or
a `grpc.StatusCode` passed beside it), when there is one. A quoted message, `…` standing for what
varies, matches a template when its pieces occur in it in order, or in templates of one source
file (a message joined from parts).
"""

from __future__ import annotations

import ast
import importlib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from loraserve.api.errors import STATUS_OF
from loraserve.metrics import AdapterStats, DecodeRecordStats, LiveState, Metrics, TierStats
from loraserve.settings import Settings, env_of, flag_of

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
SOURCES = (REPO / "server", REPO / "clients" / "python")
ELLIPSIS = "…"
MIN_QUOTED_CHARS = 10  # a quoted message says at least this much besides its `…`s
STATUS_OF_ERROR = {cls.__name__: code.name for cls, code in STATUS_OF.items()}


@dataclass(frozen=True)
class Template:
    """A string the sources may send: `text` with `…` for what varies."""

    file: str
    text: str
    status: str | None  # the gRPC status name its call sends; None: not known from the call


def _module_of(path: Path) -> str | None:
    for root in SOURCES:
        if path.is_relative_to(root):
            return ".".join(path.relative_to(root).with_suffix("").parts)
    return None


def _constant(node: ast.expr, module: object) -> str | None:
    """The value of a Name or dotted Attribute naming a str or int of the imported module."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or module is None:
        return None
    value: object = module
    for name in [node.id, *reversed(parts)]:
        value = getattr(value, name, None)
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None


def _render(node: ast.expr, module: object) -> str | None:
    """A string expression as text, `…` for its varying parts; None when not a string."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return re.sub(r"%[-.0-9]*[sdrf]", ELLIPSIS, node.value)  # %-style log arguments
    if isinstance(node, ast.JoinedStr):
        text = ""
        for part in node.values:
            if isinstance(part, ast.Constant):
                text += str(part.value)
            elif isinstance(part, ast.FormattedValue):
                value = _constant(part.value, module) if part.format_spec is None else None
                text += ELLIPSIS if value is None else value
        return text
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _render(node.left, module), _render(node.right, module)
        if left is not None or right is not None:
            return (left or ELLIPSIS) + (right or ELLIPSIS)
    return None


def _status_of_call(call: ast.Call) -> str | None:
    """The status a call raising an error of the table, or passing a `grpc.StatusCode` with
    its message, sends."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name in STATUS_OF_ERROR:
        return STATUS_OF_ERROR[name]
    for arg in call.args:
        if isinstance(arg, ast.Attribute) and getattr(arg.value, "attr", "") == "StatusCode":
            return arg.attr
    return None


@cache
def templates() -> tuple[Template, ...]:
    found: list[Template] = []
    for root in SOURCES:
        for path in sorted(root.rglob("*.py")):
            if "v1" in path.relative_to(root).parts:  # generated stubs
                continue
            name = None if path.name == "__main__.py" else _module_of(path)
            try:
                module = importlib.import_module(name) if name else None
            except ImportError:  # an optional extra (ray) that is not installed
                module = None
            tree = ast.parse(path.read_text())
            file = str(path.relative_to(REPO))
            constants = {
                target.id: text
                for node in tree.body
                if isinstance(node, ast.Assign)
                for target in node.targets
                if isinstance(target, ast.Name)
                and (text := _render(node.value, module)) is not None
            }
            statuses: dict[int, str] = {}
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and (status := _status_of_call(node)):
                    for arg in node.args:
                        for inner in ast.walk(arg):
                            statuses.setdefault(id(inner), status)
                        if isinstance(arg, ast.Name) and arg.id in constants:
                            found.append(Template(file, constants[arg.id], status))
            for node in ast.walk(tree):
                if isinstance(node, (ast.Constant, ast.JoinedStr, ast.BinOp)):
                    text = _render(node, module)
                    if text is not None and text.strip(ELLIPSIS + " "):
                        found.append(Template(file, text, statuses.get(id(node))))
    return tuple(found)


def _pieces(quoted: str) -> list[str]:
    return [p for p in (p.strip() for p in quoted.split(ELLIPSIS)) if p]


def sources_of(quoted: str) -> list[Template]:
    """The templates `quoted` comes from: one holding its pieces in order, or else, for a
    message joined from parts, templates of one file holding a piece each."""
    pieces = _pieces(quoted)
    pattern = re.compile(".*?".join(map(re.escape, pieces)), re.DOTALL)
    whole = [t for t in templates() if pattern.search(t.text)]
    if whole:
        return whole
    for file in dict.fromkeys(t.file for t in templates()):
        holding = [[t for t in templates() if t.file == file and p in t.text] for p in pieces]
        if all(holding):
            return [t for ts in holding for t in ts]
    return []


@dataclass(frozen=True)
class Quote:
    status: str  # the table's Status cell
    message: str  # one backticked message of the Message cell
    line: int


def quotes(page: Path) -> list[Quote]:
    """Each backticked message in the Message column of `page`'s tables."""
    found, columns = [], None
    for number, line in enumerate(page.read_text().splitlines(), start=1):
        if not line.startswith("|"):
            columns = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if columns is None:
            columns = cells
            assert {"Status", "Message"} <= set(columns), (
                f"{page.name}:{number}: a table "
                "without the Status and Message columns (a blank line inside a table?)"
            )
            continue
        if set(line) <= set("|- "):
            continue
        status = cells[columns.index("Status")].strip("`")
        for message in re.findall(r"`([^`]+)`", cells[columns.index("Message")]):
            found.append(Quote(status, message, number))
    return found


TROUBLESHOOTING = quotes(DOCS / "troubleshooting.md")


def test_troubleshooting_quotes_messages():
    assert len(TROUBLESHOOTING) >= 40, "the tables' Message column lost its quotes"


@pytest.mark.parametrize("quote", TROUBLESHOOTING, ids=lambda q: f"line {q.line}")
def test_each_quoted_message_is_sent_by_the_sources_with_its_status(quote):
    said = "".join(_pieces(quote.message))
    assert len(said) >= MIN_QUOTED_CHARS, f"{quote.message!r}: quote more of the message"
    found = sources_of(quote.message)
    assert found, f"troubleshooting.md:{quote.line}: {quote.message!r} is in no source"
    statuses = {t.status for t in found}
    if quote.status.isupper() and None not in statuses:  # a gRPC status the code says
        assert quote.status in statuses, (quote, statuses)


def test_a_made_up_message_or_a_wrong_status_is_caught():
    assert not sources_of("the adapter is on fire; … extinguish it")
    found = sources_of("the queue is full (… waiting requests); retry later")
    assert {t.status for t in found} == {"RESOURCE_EXHAUSTED"}
    found = sources_of("missing or unknown API key: send 'authorization: Bearer <key>' metadata")
    assert {t.status for t in found} == {"UNAUTHENTICATED"}


OPERATIONS = DOCS / "operations.md"


def test_operations_sizes_only_real_settings():
    named = []
    for line in OPERATIONS.read_text().splitlines():
        if line.startswith("| `"):
            named += re.findall(r"`([a-z_]+)`", line.split("|")[1])
    assert len(named) >= 10
    unknown = [n for n in named if n not in Settings.model_fields]
    assert not unknown, f"operations.md sizes settings that do not exist: {unknown}"


def test_operations_names_only_real_flags_and_variables():
    text = OPERATIONS.read_text()
    flags = {flag_of(n) for n in Settings.model_fields} | {"--config"}
    used = {m for m in re.findall(r"`(--[a-z-]+)", text)}
    assert used and not used - flags, f"not flags of loraserve serve: {used - flags}"
    variables = {env_of(n) for n in Settings.model_fields}
    used = set(re.findall(r"LORASERVE_[A-Z0-9_]*[A-Z0-9]", text))
    assert not used - variables, f"not settings' variables: {used - variables}"


def exported_names() -> set[str]:
    """Every metric family and sample name a server's registry exports."""
    metrics = Metrics(CollectorRegistry(), process=True)
    tier = TierStats(0, 0, 0, 0)
    adapters = AdapterStats(0, 1, 0, 0, 0, tier, tier)
    records = DecodeRecordStats(0, 0, 0, 0)
    metrics.attach_live(
        lambda: LiveState(
            0, 0, 0.0, adapters, (), (), team_wait_seconds=0.0, decode_records=records
        )
    )
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_info")


@pytest.mark.parametrize("page", ["operations.md", "troubleshooting.md"])
def test_pages_name_only_exported_metrics(page):
    exported = exported_names()
    named = re.findall(r"\b((?:loraserve|process)_[a-z0-9_]+|vllm:[a-z_]+)(\*?)",
                       (DOCS / page).read_text())  # fmt: skip
    unknown = []
    for name, star in named:
        name = name if star else name.rstrip("_")
        if name.startswith(("loraserve_client", "loraserve_serve")):
            continue  # a package or a command, not a metric
        bare = next((name[: -len(s)] for s in SUFFIXES if name.endswith(s)), name)
        if star:
            ok = any(e.startswith(name) for e in exported)
        else:
            ok = name in exported or bare in exported
        if not ok:
            unknown.append(name)
    assert named and not unknown, f"{page} names metrics the server does not export: {unknown}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", ["architecture.md", "operations.md", "troubleshooting.md"])
def test_links_reach_a_file_and_heading(page):
    links = re.findall(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)", (DOCS / page).read_text())
    assert links
    for target, anchor in links:
        path = DOCS / target
        assert path.is_file(), f"{page}: link to {target}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(), re.MULTILINE)
            assert anchor in map(slug, headings), f"{page}: no heading #{anchor} in {target}"
