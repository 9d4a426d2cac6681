"""The disk store: publish / resolve / list / delete, validation, crash safety, path safety."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tests.adapters import crash_publisher
from tests.conftest import ADAPTER_SPECS, write_adapter
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from loraserve.adapters import peft_config, safetensors_file
from loraserve.adapters.keys import store_key
from loraserve.adapters.manifest import IDENTIFIER_RULE, AdapterRef, base_fingerprint
from loraserve.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, read_peft_adapter
from loraserve.adapters.staging import AdapterPublisher
from loraserve.adapters.store import AdapterStore
from loraserve.model.tiny import write_tiny_model
from loraserve.types import (
    AdapterExistsError,
    AdapterIncompatibleError,
    AdapterNotFoundError,
    AdapterRefusedError,
    InvalidAdapterError,
    InvalidRequestError,
)

MAX_RANK = 16
SPECS = {spec.name: spec for spec in ADAPTER_SPECS}


@dataclass(frozen=True)
class Base:
    targets: dict[str, tuple[int, int]]
    fingerprint: str
    first: Path  # a PEFT directory, rank 4 on attention
    second: Path  # another, rank 1 on q and v


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    root = tmp_path_factory.mktemp("store-base")
    model_dir = write_tiny_model(root / "llama", "llama")
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    targets = {
        name: (m.in_features, m.out_features)
        for name, m in skeleton.named_modules()
        if isinstance(m, nn.Linear) and m is not skeleton.get_output_embeddings()
    }
    return Base(
        targets,
        base_fingerprint(config.to_dict(), "nf4"),
        write_adapter(model_dir, root / "first", SPECS["r4-attn"], seed=1),
        write_adapter(model_dir, root / "second", SPECS["r1-qv"], seed=2),
    )


def make_publisher(base: Base, root: Path, checkpoint=None) -> AdapterPublisher:
    """A publisher validating against `base`, over a store at `root` (`.store`)."""
    return AdapterPublisher(
        AdapterStore(root, checkpoint), base.fingerprint, base.targets, MAX_RANK
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(top: Path, mtimes: bool = True) -> dict[str, tuple]:
    """Every entry under `top` with its kind, size and (optionally) mtime."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for entry in [".", *dirnames, *filenames]:
            st = os.lstat(Path(dirpath) / entry)
            key = os.path.normpath(os.path.relpath(Path(dirpath) / entry, top))
            entries[key] = (st.st_mode, st.st_size, st.st_mtime_ns if mtimes else 0)
    return entries


def assert_intact(store: AdapterStore, ref: AdapterRef) -> None:
    """The version's files are exactly what its manifest records."""
    manifest = store.manifest(ref)
    directory = store.path(ref)
    assert sorted(p.name for p in directory.iterdir()) == sorted([*manifest.files, "manifest.json"])
    for filename, facts in manifest.files.items():
        assert sha256(directory / filename) == facts["sha256"]
        assert (directory / filename).stat().st_size == facts["size"]


def test_publish_resolve_delete_lifecycle(base, tmp_path):
    publisher = make_publisher(base, tmp_path / "root")
    store = publisher.store
    first = publisher.publish_dir("acme", "chat", base.first)
    assert (first.version, first.rank, first.lora_alpha, first.dtype) == ("1", 4, 8.0, "float32")
    assert first.target_modules == ("k_proj", "o_proj", "q_proj", "v_proj")
    assert first.base_fingerprint == base.fingerprint
    assert first.files[WEIGHTS_FILE]["sha256"] == sha256(base.first / WEIGHTS_FILE)
    assert store.resolve("acme", "chat") == AdapterRef("acme", "chat", "1")
    assert_intact(store, first.ref)
    read_peft_adapter(store.path(first.ref), base.targets, MAX_RANK, torch.float32)

    files = {f: (base.second / f).read_bytes() for f in (CONFIG_FILE, WEIGHTS_FILE)}
    second = publisher.publish("acme", "chat", files)
    assert second.version == "2" and store.resolve("acme", "chat").version == "2"
    assert store.resolve("acme", "chat", "1") == first.ref
    assert store.lookup("acme", "chat") == store_key(second) != store_key(first)
    assert store.lookup("acme", "chat", "1") == store_key(first)
    assert store.directory(store_key(first)) == store.path(first.ref)
    for missing in [("acme", "other"), ("acme", "chat", "3"), ("acme", "my adapter")]:
        assert store.lookup(*missing) is None

    with pytest.raises(AdapterExistsError, match="versions are immutable"):
        publisher.publish("acme", "chat", files, version="1")
    assert store.manifest(first.ref) == first
    assert_intact(store, first.ref)

    restarted = AdapterStore(tmp_path / "root")
    assert restarted.list_adapters("acme") == ([first, second], "")
    assert restarted.resolve("acme", "chat").version == "2"

    store.delete("acme", "chat", "2")
    assert store.resolve("acme", "chat").version == "1"
    assert (tmp_path / "root/acme/chat/latest").read_text().strip() == "1"
    with pytest.raises(AdapterNotFoundError, match="no version '2'"):
        store.resolve("acme", "chat", "2")
    store.delete("acme", "chat")
    with pytest.raises(AdapterNotFoundError, match="not published"):
        store.resolve("acme", "chat")
    with pytest.raises(AdapterNotFoundError):
        store.delete("acme", "chat")
    assert not (tmp_path / "root/acme/chat").exists()
    assert list((tmp_path / "root/.staging").iterdir()) == []


def test_list_pages_by_name_then_version(base, tmp_path):
    publisher = make_publisher(base, tmp_path / "root")
    store = publisher.store
    published = [
        publisher.publish_dir("acme", "beta", base.second),
        publisher.publish_dir("acme", "alpha", base.second),
        publisher.publish_dir("acme", "alpha", base.second, version="10"),
        publisher.publish_dir("acme", "alpha", base.second, version="exp"),
        publisher.publish_dir("other", "alpha", base.second),
    ]
    assert publisher.publish_dir("acme", "alpha", base.second).version == "11"
    published.append(store.manifest(AdapterRef("acme", "alpha", "11")))
    expected = [("alpha", "1"), ("alpha", "10"), ("alpha", "11"), ("alpha", "exp"), ("beta", "1")]
    for page_size in (1, 2, 4, 5, 0):
        seen, token, pages = [], "", 0
        while True:
            page, token = store.list_adapters("acme", page_size, token)
            seen += [(m.name, m.version) for m in page]
            pages += 1
            if not token:
                break
        assert seen == expected
        assert pages == -(-len(expected) // (page_size or 100))
    assert store.list_adapters("nobody") == ([], "")
    for bad in ("garbage", "W10=", "WyIuLiIsICIxIl0="):  # not base64 json, [], ["..", "1"]
        with pytest.raises(InvalidRequestError, match="page_token"):
            store.list_adapters("acme", 2, bad)
    with pytest.raises(InvalidRequestError, match="page_size"):
        store.list_adapters("acme", -1)


def test_streaming_upload_and_abandoned_uploads(base, tmp_path):
    publisher = make_publisher(base, tmp_path / "root")
    store = publisher.store
    weights = (base.first / WEIGHTS_FILE).read_bytes()
    with publisher.staging("acme", "chat", version="v1") as upload:
        upload.write(CONFIG_FILE, (base.first / CONFIG_FILE).read_bytes())
        for start in range(0, len(weights), 1000):
            upload.write(WEIGHTS_FILE, weights[start : start + 1000])
        manifest = upload.commit()
    assert manifest.files[WEIGHTS_FILE]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert_intact(store, manifest.ref)

    with pytest.raises(RuntimeError), publisher.staging("acme", "chat") as upload:
        upload.write(CONFIG_FILE, b"{}")
        raise RuntimeError("client went away")
    with publisher.staging("acme", "chat") as upload:
        upload.write(WEIGHTS_FILE, weights)
    assert list((tmp_path / "root/.staging").iterdir()) == []
    assert store.list_adapters("acme")[0] == [manifest]


def test_import_takes_safetensors_and_refuses_pickle_only_directories(base, tmp_path):
    publisher = make_publisher(base, tmp_path / "root")
    store = publisher.store
    both = tmp_path / "both"
    shutil.copytree(base.first, both)
    (both / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    manifest = publisher.publish_dir("acme", "chat", both)
    assert sorted(p.name for p in store.path(manifest.ref).iterdir()) == [
        CONFIG_FILE,
        WEIGHTS_FILE,
        "manifest.json",
    ]
    (both / WEIGHTS_FILE).unlink()
    with pytest.raises(InvalidAdapterError, match=re.escape("'adapter_model.bin': pickle")):
        publisher.publish_dir("acme", "chat", both)
    with pytest.raises(InvalidAdapterError, match="does not exist"):
        publisher.publish_dir("acme", "chat", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidAdapterError, match=r"'.*empty' is empty: it must hold adapter_c"):
        publisher.publish_dir("acme", "chat", tmp_path / "empty")
    assert [m.version for m in store.list_adapters("acme")[0]] == ["1"]


def test_concurrent_publishes_get_distinct_versions(base, tmp_path):
    publisher = make_publisher(base, tmp_path / "root")
    store = publisher.store
    versions, errors = [], []

    def publish() -> None:
        try:
            versions.append(publisher.publish_dir("acme", "chat", base.second).version)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=publish) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and sorted(versions, key=int) == ["1", "2", "3", "4", "5", "6"]
    assert store.resolve("acme", "chat").version in versions


# -- validation -------------------------------------------------------------------------------


@dataclass
class Adapter:
    """A valid adapter's parts, for a case to break."""

    config: dict
    tensors: dict[str, torch.Tensor]
    files: dict[str, bytes] = field(default_factory=dict)  # overrides / extra files
    expected_sha256: dict[str, str] | None = None

    def module(self, kind: str, index: int = 0) -> str:
        return sorted(n for n in self.tensors if f"lora_{kind}" in n)[index]

    def upload(self) -> dict[str, bytes]:
        return {
            CONFIG_FILE: json.dumps(self.config).encode(),
            WEIGHTS_FILE: save_safetensors(self.tensors),
            **self.files,
        }


def _unknown_module(adapter: Adapter) -> None:
    for name in [n for n in adapter.tensors if ".layers.1.self_attn.q_proj." in n]:
        adapter.tensors[name.replace("q_proj", "zz_proj")] = adapter.tensors.pop(name)


def _rank_too_high(adapter: Adapter) -> None:
    a, b = adapter.module("A"), adapter.module("B")
    adapter.tensors[a] = adapter.tensors[a].repeat(5, 1)  # [20, in]
    adapter.tensors[b] = adapter.tensors[b].repeat(1, 5)  # [out, 20]


def _set(adapter: Adapter, kind: str, index: int, tensor_fn) -> None:
    name = adapter.module(kind, index)
    adapter.tensors[name] = tensor_fn(adapter.tensors[name])


def _with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[0, 0] = float("nan")
    return t


def _several(adapter: Adapter) -> None:
    _set(adapter, "A", 1, _with_nan)
    _set(adapter, "A", 2, lambda t: t.to(torch.int8))
    _unknown_module(adapter)


def _header_claims(length: int):
    return lambda adapter: adapter.files.update(
        {WEIGHTS_FILE: length.to_bytes(8, "little") + b"{}"}
    )


VALIDATION_CASES = {
    "unknown config key": (
        lambda a: a.config.update(lora_magic=1),
        InvalidAdapterError,
        ["unknown keys ['lora_magic']"],
    ),
    "non-LoRA type": (
        lambda a: a.config.update(peft_type="IA3"),
        InvalidAdapterError,
        ["peft_type 'IA3' is not served: loraserve serves LoRA adapters only"],
    ),
    "DoRA without magnitudes": (
        lambda a: a.config.update(use_dora=True),
        InvalidAdapterError,
        ["use_dora is set, but it has no lora_magnitude_vector"],
    ),
    "modules_to_save": (
        lambda a: a.config.update(modules_to_save=["lm_head"]),
        InvalidAdapterError,
        ["modules_to_save is set: modules_to_save (full copies of base modules) is not served"],
    ),
    "pickle only": (
        lambda a: a.files.update({WEIGHTS_FILE: None, "adapter_model.bin": b"\x80\x04K\x01."}),
        InvalidAdapterError,
        ["'adapter_model.bin': pickle files are never loaded", "safetensors.torch.save_file"],
    ),
    "unexpected file": (
        lambda a: a.files.update({"manifest.json": b"{}", "../evil": b""}),
        InvalidAdapterError,
        ["'manifest.json' is not an adapter file", "'../evil' is not an adapter file"],
    ),
    "bad checksum": (
        lambda a: setattr(a, "expected_sha256", {WEIGHTS_FILE: "0" * 64}),
        InvalidAdapterError,
        [f"{WEIGHTS_FILE}: sha256", "does not match the expected 0000"],
    ),
    "NaN": (lambda a: _set(a, "B", 0, _with_nan), InvalidAdapterError, ["NaN or infinity"]),
    "wrong shape": (
        lambda a: _set(a, "A", 0, lambda t: torch.zeros(t.shape[0], t.shape[1] + 1)),
        AdapterIncompatibleError,
        ["k_proj: adapter is [in=129, out=64], base module is [in=128, out=64]"],
    ),
    "not [r, in] and [out, r]": (
        lambda a: _set(a, "A", 0, lambda t: t.t().contiguous()),
        InvalidAdapterError,
        ["are not [r, in] and [out, r]"],
    ),
    "unknown module": (
        _unknown_module,
        AdapterIncompatibleError,
        ["zz_proj: the base model has no LoRA-targetable module there"],
    ),
    "rank too high": (
        _rank_too_high,
        AdapterIncompatibleError,
        [f"rank 20 exceeds the server's max rank {MAX_RANK}"],
    ),
    "int8 dtype": (
        lambda a: _set(a, "A", 0, lambda t: t.to(torch.int8)),
        InvalidAdapterError,
        ["dtype torch.int8/torch.float32 not allowed (fp16, bf16, fp32)"],
    ),
    "only lora_A": (
        lambda a: a.tensors.pop(a.module("B")),
        InvalidAdapterError,
        ["needs both lora_A and lora_B, found only lora_A"],
    ),
    "no LoRA tensors": (
        lambda a: a.tensors.clear(),
        InvalidAdapterError,
        [f"{WEIGHTS_FILE} holds no LoRA tensors"],
    ),
    "oversized header": (
        _header_claims(10**12),
        InvalidAdapterError,
        ["header claims 1000000000000 bytes, over the 100000000 byte cap"],
    ),
    "truncated header": (
        _header_claims(4096),
        InvalidAdapterError,
        ["header claims 4096 bytes of a 10 byte file"],
    ),
    "oversized config": (
        lambda a: a.config.update(base_model_name_or_path="x" * (1 << 20)),
        InvalidAdapterError,
        [f"{CONFIG_FILE} is larger than the 1048576 byte cap"],
    ),
    "every problem at once": (
        _several,
        InvalidAdapterError,
        ["NaN or infinity", "torch.int8", "zz_proj: the base model has no LoRA-targetable"],
    ),
}


@pytest.mark.parametrize("case", VALIDATION_CASES)
def test_invalid_publish_reports_and_leaves_nothing(base, tmp_path, case):
    break_adapter, error, messages = VALIDATION_CASES[case]
    publisher = make_publisher(base, tmp_path / "root")
    store = publisher.store
    publisher.publish_dir("acme", "chat", base.first)
    before = snapshot(tmp_path, mtimes=False)
    adapter = Adapter(
        json.loads((base.first / CONFIG_FILE).read_text()),
        load_safetensors((base.first / WEIGHTS_FILE).read_bytes()),
    )
    break_adapter(adapter)
    files = {k: v for k, v in adapter.upload().items() if v is not None}
    with pytest.raises(AdapterRefusedError) as caught:
        publisher.publish("acme", "chat", files, expected_sha256=adapter.expected_sha256)
    assert type(caught.value) is error
    for message in messages:
        assert message in str(caught.value)
    assert store.resolve("acme", "chat").version == "1"
    assert [m.version for m in store.list_adapters("acme")[0]] == ["1"]
    assert snapshot(tmp_path, mtimes=False) == before


def test_weights_over_the_size_cap_are_refused_while_streaming(base, tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_file, "MAX_WEIGHTS_BYTES", 1000)
    publisher = make_publisher(base, tmp_path / "root")
    with pytest.raises(InvalidAdapterError, match="larger than the 1000 byte cap"):
        publisher.publish_dir("acme", "chat", base.first)
    assert list((tmp_path / "root/.staging").iterdir()) == []


def test_config_allow_list_covers_what_installed_peft_writes(tmp_path):
    LoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(tmp_path)
    written = set(json.loads((tmp_path / CONFIG_FILE).read_text()))
    assert written - peft_config.CONFIG_KEYS == set()


def test_base_fingerprint_depends_on_shapes_and_quantization_only():
    config = {"model_type": "llama", "hidden_size": 128, "vocab_size": 512}
    same = base_fingerprint({**config, "torch_dtype": "bfloat16", "name": "x"}, "nf4")
    assert base_fingerprint(config, "nf4") == same
    assert base_fingerprint({**config, "hidden_size": 256}, "nf4") != same
    assert base_fingerprint(config, "none") != same


# -- crash safety ------------------------------------------------------------------------------


def assert_consistent(base: Base, root: Path) -> set[str]:
    """After a restart: staging is empty, every version on disk is indexed and complete, and
    `latest` names one of them. Returns the versions present."""
    store = AdapterStore(root)
    assert list((root / ".staging").iterdir()) == []
    versions_dir = root / crash_publisher.TENANT / crash_publisher.NAME / "versions"
    on_disk = {p.name for p in versions_dir.iterdir()} if versions_dir.exists() else set()
    sources = {"1": base.first, "2": base.second, "exp": base.second}
    for version in on_disk:
        ref = AdapterRef(crash_publisher.TENANT, crash_publisher.NAME, version)
        assert_intact(store, ref)
        assert sha256(store.path(ref) / WEIGHTS_FILE) == sha256(sources[version] / WEIGHTS_FILE)
    listed = {m.version for m in store.list_adapters(crash_publisher.TENANT)[0]}
    assert listed == on_disk
    if on_disk:
        assert store.resolve(crash_publisher.TENANT, crash_publisher.NAME).version in on_disk
    return on_disk


@pytest.mark.slow
def test_a_crash_at_any_step_leaves_each_version_absent_or_complete(base, tmp_path):
    steps = []
    recorder = make_publisher(base, tmp_path / "recorded", checkpoint=steps.append)
    crash_publisher.scenario(recorder, base.first, base.second)
    wanted = {"publish:chunk-written", "publish:files-written", "publish:renamed", "delete:moved"}
    assert wanted <= set(steps) and len(steps) >= 20  # kill points inside the bytes too

    targets_json = tmp_path / "targets.json"
    targets_json.write_text(json.dumps(base.targets))
    command = [sys.executable, crash_publisher.__file__, tmp_path / "crash", targets_json]
    done = subprocess.run(
        [*command, base.first, base.second, str(len(steps))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == [-signal.SIGKILL] * len(steps), done.stderr[-3000:]
    outcomes = [assert_consistent(base, tmp_path / f"crash-{i}") for i in range(len(steps))]
    assert outcomes[steps.index("publish:chunk-written")] == set()  # mid-upload
    assert outcomes[steps.index("publish:files-written")] == set()  # before v1 was in place
    assert outcomes[steps.index("publish:renamed")] == {"1"}  # v1 in place, no `latest` yet
    assert {"1", "2"} in outcomes and {"1", "exp"} in outcomes


def test_start_up_cleans_staging_and_ignores_broken_versions(base, tmp_path):
    root = tmp_path / "root"
    publisher = make_publisher(base, root)
    for _ in range(3):
        publisher.publish_dir("acme", "chat", base.second)
    versions = root / "acme/chat/versions"
    (root / ".staging/leftover").mkdir()
    (root / ".staging/leftover/adapter_model.safetensors").write_bytes(b"partial")
    (versions / "3/manifest.json").unlink()
    os.chmod(versions / "2" / WEIGHTS_FILE, 0o644)
    with open(versions / "2" / WEIGHTS_FILE, "ab") as f:
        f.write(b"x")  # size no longer matches the manifest
    (versions / "4").mkdir()
    manifest = json.loads((versions / "1/manifest.json").read_text())
    (versions / "4/manifest.json").write_text(json.dumps({**manifest, "created_at": 5}))
    (versions / "bad..name").mkdir()

    restarted = make_publisher(base, root)
    assert list((root / ".staging").iterdir()) == []
    assert [m.version for m in restarted.store.list_adapters("acme")[0]] == ["1"]
    assert restarted.store.resolve("acme", "chat").version == "1"  # latest was the broken 3
    assert (root / "acme/chat/latest").read_text().strip() == "1"
    # the next integer skips the ignored directories rather than colliding with them
    assert restarted.publish_dir("acme", "chat", base.second).version == "5"


def test_a_stray_entry_at_the_root_is_warned_about_and_the_stores_readme_is_not(
    base, tmp_path, caplog
):
    root = tmp_path / "root"
    make_publisher(base, root).publish_dir("acme", "chat", base.second)
    (root / "README.md").write_text("what this store holds")
    (root / "notes.txt").write_text("a stray file")
    with caplog.at_level("WARNING", logger="loraserve.adapters.store_index"):
        restarted = make_publisher(base, root)
    ignored = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ignoring")]
    assert ignored == [f"ignoring {root / 'notes.txt'}: not a directory named as a valid tenant"]
    assert restarted.store.resolve("acme", "chat").version == "1"


# -- identifiers and links ---------------------------------------------------------------------

BAD_IDENTIFIERS = [
    "../x", "..", ".", "/abs", "a/b", "a\\b", "%2e%2e", ".hidden", "a" * 65, "", "a\x00b",
    "a\n", "a..b", "-dash", "ü",
]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_IDENTIFIERS)
def test_bad_identifiers_are_refused_before_touching_disk(base, tmp_path, bad):
    root = tmp_path / "root"
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep").write_text("outside the root")
    publisher = make_publisher(base, root)
    store = publisher.store
    publisher.publish_dir("acme", "chat", base.second)
    before = snapshot(tmp_path)
    calls = [
        lambda: publisher.publish_dir(bad, "chat", base.second),
        lambda: publisher.publish_dir("acme", bad, base.second),
        lambda: publisher.publish_dir("acme", "chat", base.second, version=bad),
        lambda: publisher.staging("acme", bad).__enter__(),
        lambda: store.resolve(bad, "chat"),
        lambda: store.resolve("acme", bad),
        lambda: store.resolve("acme", "chat", bad),
        lambda: store.delete(bad, "chat"),
        lambda: store.delete("acme", bad),
        lambda: store.delete("acme", "chat", bad),
        lambda: store.path(AdapterRef("acme", "chat", bad)),
        lambda: store.list_adapters(bad),
    ]
    for call in calls:
        with pytest.raises(InvalidRequestError, match=re.escape(IDENTIFIER_RULE)):
            call()
    assert snapshot(tmp_path) == before
    assert store.resolve("acme", "chat").version == "1"


def test_symbolic_links_below_the_root_are_refused(base, tmp_path):
    elsewhere = make_publisher(base, tmp_path / "elsewhere")
    elsewhere.publish_dir("acme", "chat", base.second)
    elsewhere.publish_dir("evil", "chat", base.second)
    root = tmp_path / "root"
    make_publisher(base, root).publish_dir("acme", "real", base.second)
    os.symlink(tmp_path / "elsewhere/acme/chat", root / "acme/chat")  # name -> outside
    os.symlink(tmp_path / "elsewhere/evil", root / "evil")  # tenant -> outside
    os.symlink(tmp_path / "elsewhere/acme/chat/versions/1", root / "acme/real/versions/2")
    outside = tmp_path / "elsewhere"
    before = snapshot(outside)

    publisher = make_publisher(base, root)

    store = publisher.store
    assert [(m.name, m.version) for m in store.list_adapters("acme")[0]] == [("real", "1")]
    assert store.list_adapters("evil") == ([], "")
    refused = [
        lambda: publisher.publish_dir("acme", "chat", base.second),
        lambda: publisher.publish_dir("evil", "chat", base.second),
        lambda: publisher.publish_dir("acme", "real", base.second, version="2"),
        lambda: store.resolve("acme", "chat"),
        lambda: store.resolve("evil", "chat", "1"),
        lambda: store.resolve("acme", "real", "2"),
        lambda: store.manifest(AdapterRef("acme", "chat", "1")),
        lambda: store.path(AdapterRef("acme", "real", "2")),
        lambda: store.directory(
            store_key(elsewhere.store.manifest(AdapterRef("acme", "chat", "1")))
        ),
        lambda: store.delete("acme", "chat"),
        lambda: store.delete("evil", "chat"),
        lambda: store.delete("acme", "real", "2"),
    ]
    for call in refused:
        with pytest.raises(InvalidRequestError, match="is a symbolic link"):
            call()
    assert store.lookup("acme", "chat") is None  # links are never indexed
    store.delete("acme", "real")  # removes the link inside it, not what it points at
    assert not (root / "acme/real").exists()
    assert snapshot(outside) == before
    assert (root / "acme/chat").is_symlink() and (root / "evil").is_symlink()
