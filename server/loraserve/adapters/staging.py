"""Publishing new adapter versions: stream the files into staging, check, validate, place.

`AdapterPublisher.staging` gives a `StagedUpload`: `write(filename, chunk)` as bytes arrive,
then `commit()`, which checks the checksums the uploader declared, validates the files against
the base model (`peft_format`: CPU only, no network, no code import), writes the manifest and
has the store place the version atomically. A version that exists, or one the tenant's quota
has no room for, is refused before any byte is staged (and the quota checked again when
placed). Whatever is not committed is removed. The weights the commit validated go to
`on_published` (the host tier), so the first request for the new version neither reads nor
validates them again. `describe_shared` validates and describes an operator's directory.

`upload_file_problems` is the one check of an upload's file names, for every way in.

Knows nothing about gRPC, devices or requests; the disk layout is the store's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import torch

from loraserve.adapters import peft_format, safetensors_file
from loraserve.adapters.keys import AdapterKey, store_key
from loraserve.adapters.manifest import ADAPTER_FILES, AdapterManifest, check_identifier
from loraserve.adapters.store import AdapterStore
from loraserve.types import (
    UNLIMITED,
    AdapterRefusedError,
    InvalidAdapterError,
    InvalidRequestError,
    TenantQuota,
)

CHUNK_BYTES = 1 << 20
SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")

OnPublished = Callable[[AdapterKey, peft_format.LoraWeights], None]
Prepare = Callable[[peft_format.LoraWeights], peft_format.LoraWeights]


def upload_file_problems(filenames: Sequence[str], complete: bool = True) -> list[str]:
    """Every problem with the file names of one upload (empty when they are fine).

    Only adapter_config.json and adapter_model.safetensors may be uploaded, each once: a pickle
    is refused with the advice to convert it, anything else by its name. `complete`: both files
    must be there.
    """
    problems = []
    for filename in dict.fromkeys(filenames):
        shown = repr(filename[:80])
        if filenames.count(filename) > 1:
            problems.append(f"{shown} is listed more than once")
        if filename in ADAPTER_FILES:
            continue
        if filename in peft_format.PICKLE_FILES or filename.endswith(PICKLE_SUFFIXES):
            problems.append(f"{shown}: {peft_format.PICKLE_ADVICE}")
        else:
            problems.append(
                f"{shown} is not an adapter file: upload only {' and '.join(ADAPTER_FILES)}"
            )
    missing = [f for f in ADAPTER_FILES if f not in filenames]
    if complete and missing:
        problems.append(f"{' and '.join(missing)} not uploaded: send {' and '.join(ADAPTER_FILES)}")
    return problems


@dataclass
class _StagedFile:
    handle: BinaryIO
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    size: int = 0


class StagedUpload:
    """One version being written into a staging directory; see `AdapterPublisher.staging`."""

    def __init__(
        self,
        publisher: AdapterPublisher,
        directory: Path,
        tenant: str,
        name: str,
        version: str | None,
        expected_sha256: Mapping[str, str] | None,
        quota: TenantQuota = UNLIMITED,
    ) -> None:
        self.publisher, self.directory = publisher, directory
        self.tenant, self.name, self.version = tenant, name, version
        self.expected_sha256 = dict(expected_sha256 or {})
        self.quota = quota
        self.manifest: AdapterManifest | None = None
        self._files: dict[str, _StagedFile] = {}

    def write(self, filename: str, chunk: bytes) -> None:
        """Append `chunk` to `filename` (adapter_config.json or adapter_model.safetensors)."""
        problems = upload_file_problems([filename], complete=False)
        if problems:
            raise InvalidAdapterError(f"upload of {self.tenant}/{self.name} refused:", problems)
        staged = self._files.get(filename)
        if staged is None:
            staged = self._files[filename] = _StagedFile((self.directory / filename).open("xb"))
        cap = safetensors_file.MAX_WEIGHTS_BYTES
        if filename == peft_format.CONFIG_FILE:
            cap = peft_format.MAX_CONFIG_BYTES
        if staged.size + len(chunk) > cap:
            raise InvalidAdapterError(
                f"upload of {self.tenant}/{self.name} refused:",
                [f"{filename} is larger than the {cap} byte cap"],
            )
        staged.handle.write(chunk)
        staged.digest.update(chunk)
        staged.size += len(chunk)
        self.publisher.store.checkpoint("publish:chunk-written")

    def commit(self) -> AdapterManifest:
        """Check checksums, validate against the base, and publish; returns the manifest."""
        if self.manifest is not None:
            raise InvalidRequestError(f"{self.manifest.ref} is already committed")
        self._seal()
        problems = []
        for filename, expected in sorted(self.expected_sha256.items()):
            staged = self._files.get(filename)
            if staged is None:
                problems.append(f"{filename}: a checksum was given but the file was not uploaded")
            elif staged.digest.hexdigest() != expected.lower():
                problems.append(
                    f"{filename}: sha256 {staged.digest.hexdigest()} does not match the "
                    f"expected {expected}"
                )
        if problems:
            raise InvalidAdapterError(f"upload of {self.tenant}/{self.name} is corrupt:", problems)
        publisher, store = self.publisher, self.publisher.store
        store.checkpoint("publish:files-written")
        try:
            weights = peft_format.read_peft_adapter(
                self.directory, publisher.targets, publisher.max_rank, publisher.dtype
            )
            if publisher.prepare is not None:
                weights = publisher.prepare(weights)
        except AdapterRefusedError as e:  # name the upload, not the staging directory
            verdict = "is invalid" if isinstance(e, InvalidAdapterError) else "does not fit"
            raise e.reworded(f"upload of {self.tenant}/{self.name} {verdict}:") from None
        files = {name: (f.digest.hexdigest(), f.size) for name, f in self._files.items()}
        manifest = publisher.manifest(
            self.tenant, self.name, self.version or "", files, weights, self.directory
        )
        self.manifest = store.place(self.directory, manifest, self.quota)
        if publisher.on_published is not None:
            publisher.on_published(store_key(self.manifest), weights)
        return self.manifest

    def _seal(self) -> None:
        """Flush, fsync and close every file written so far (read-only from now on)."""
        for filename, staged in self._files.items():
            if not staged.handle.closed:
                staged.handle.flush()
                os.fsync(staged.handle.fileno())
                staged.handle.close()
                os.chmod(self.directory / filename, 0o444)

    def _discard(self) -> None:
        for staged in self._files.values():
            staged.handle.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class AdapterPublisher:
    """Validate and publish new versions into `store`; safe across threads.

    targets: module path -> (in_features, out_features) of the base's LoRA-targetable modules;
    every version is validated against them and `max_rank`, read in `dtype` (the engine's
    compute dtype, so the validated weights can serve as they are), and recorded with
    `base_fingerprint`. prepare(weights), when given, checks them against the live base model
    (DoRA's norms, trained biases) before anything is placed, raising AdapterRefusedError;
    on_published(key, weights) receives each committed version's weights.
    """

    def __init__(
        self,
        store: AdapterStore,
        base_fingerprint: str,
        targets: dict[str, tuple[int, int]],
        max_rank: int,
        dtype: torch.dtype = torch.float32,
        on_published: OnPublished | None = None,
        prepare: Prepare | None = None,
    ) -> None:
        self.store = store
        self.base_fingerprint = base_fingerprint
        self.targets = targets
        self.max_rank = max_rank
        self.dtype = dtype
        self.on_published = on_published
        self.prepare = prepare

    def manifest(
        self,
        tenant: str,
        name: str,
        version: str,
        files: Mapping[str, tuple[str, int]],
        weights: peft_format.LoraWeights,
        directory: Path,
    ) -> AdapterManifest:
        """The manifest of validated `weights` whose files (name -> (sha256, size)) are in
        `directory`."""
        header = safetensors_file.safetensors_header(directory / peft_format.WEIGHTS_FILE)
        dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        return AdapterManifest(
            tenant=tenant,
            name=name,
            version=version,
            files={f: {"sha256": sha, "size": size} for f, (sha, size) in sorted(files.items())},
            rank=weights.rank,
            target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in weights.modules})),
            lora_alpha=weights.config.lora_alpha,
            use_rslora=weights.config.use_rslora,
            dtype=",".join(sorted(SAFETENSORS_DTYPES.get(d, d) for d in dtypes)),
            created_at=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            base_fingerprint=self.base_fingerprint,
        )

    def describe_shared(
        self, name: str, directory: Path
    ) -> tuple[AdapterManifest, peft_format.LoraWeights]:
        """Validate an operator's adapter directory (`--adapter NAME=DIR`) and describe it, for
        Get and List, as a manifest without tenant or version; returns its weights too."""
        check_identifier("adapter name", name)
        weights = peft_format.read_peft_adapter(directory, self.targets, self.max_rank, self.dtype)
        files = {}
        for filename in ADAPTER_FILES:
            digest = hashlib.sha256()
            with (directory / filename).open("rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    digest.update(chunk)
            files[filename] = (digest.hexdigest(), (directory / filename).stat().st_size)
        return self.manifest("", name, "", files, weights, directory), weights

    @contextlib.contextmanager
    def staging(
        self,
        tenant: str,
        name: str,
        version: str | None = None,
        expected_sha256: Mapping[str, str] | None = None,
        quota: TenantQuota = UNLIMITED,
        declared_bytes: int = 0,
    ) -> Iterator[StagedUpload]:
        """A writer for one new version: `write(filename, chunk)` as bytes arrive, then
        `commit()`. Whatever was not committed is removed on exit.

        The version must not exist, and `quota` must have room for it: checked now for
        `declared_bytes` (the sizes an uploader announced) and again at commit."""
        self.store.check_writable(tenant, name, version, quota, declared_bytes)
        directory = self.store.staging_directory()
        upload = StagedUpload(self, directory, tenant, name, version, expected_sha256, quota)
        try:
            yield upload
        finally:
            if upload.manifest is None:
                upload._discard()

    def publish(
        self,
        tenant: str,
        name: str,
        files: Mapping[str, bytes | str | Path],
        version: str | None = None,
        expected_sha256: Mapping[str, str] | None = None,
    ) -> AdapterManifest:
        """Publish a new version from file contents or paths; `version` None -> next integer."""
        self.store.check_writable(tenant, name, version)
        problems = upload_file_problems(sorted(files))
        if problems:
            raise InvalidAdapterError(f"upload of {tenant}/{name} refused:", problems)
        with self.staging(tenant, name, version, expected_sha256) as upload:
            for filename, content in sorted(files.items()):
                if isinstance(content, bytes):
                    upload.write(filename, content)
                    continue
                with open(content, "rb") as f:
                    while chunk := f.read(CHUNK_BYTES):
                        upload.write(filename, chunk)
            return upload.commit()

    def publish_dir(
        self, tenant: str, name: str, src_dir: str | Path, version: str | None = None
    ) -> AdapterManifest:
        """Import an existing PEFT directory (other files there, e.g. README.md, are ignored)."""
        src = Path(src_dir)
        if not src.is_dir():
            raise InvalidAdapterError(f"adapter directory {str(src)!r} does not exist")
        if not any(src.iterdir()):
            raise InvalidAdapterError(
                f"adapter directory {str(src)!r} is empty: it must hold "
                f"{' and '.join(ADAPTER_FILES)}, as PEFT's save_pretrained writes them"
            )
        wanted: tuple[str, ...] = ADAPTER_FILES  # pickles only without safetensors: refused by name
        if not (src / peft_format.WEIGHTS_FILE).is_file():
            wanted += peft_format.PICKLE_FILES
        return self.publish(
            tenant, name, {f: src / f for f in wanted if (src / f).is_file()}, version
        )
