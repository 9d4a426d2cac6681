"""Reading a PEFT adapter directory for upload: the local refusal of what can never be accepted,
the files' SHA-256 and sizes, the UploadAdapter message stream and a plain-text progress bar.

The stream is one header (name, version, both files' digests and sizes) then each file in
chunks of at most 1 MiB. Knows nothing about channels, and nothing about what the server
validates inside the files (rank, target modules, shapes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from loraserve_client.errors import InvalidArgument
from loraserve_client.v1 import adapters_pb2

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CHUNK_BYTES = 1 << 20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass(frozen=True)
class LocalFile:
    path: Path
    sha256: str
    size_bytes: int


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def adapter_files(directory: str | Path) -> list[LocalFile]:
    """The config and the weights of a PEFT directory, in upload order, with their digests.

    Raises InvalidArgument, before anything touches the network, when either file is missing.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidArgument(f"{directory} is not a directory")
    if not any(directory.iterdir()):
        raise InvalidArgument(
            f"{directory} is empty: an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}, "
            "as PEFT's model.save_pretrained(dir) writes them"
        )
    if not (directory / WEIGHTS_FILE).is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not pickles:
            raise InvalidArgument(
                f"{directory} has no {WEIGHTS_FILE}: save the adapter with PEFT's "
                "model.save_pretrained(dir)"
            )
        raise InvalidArgument(
            f"{directory} has no {WEIGHTS_FILE} (found {', '.join(pickles)}): pickle files are "
            "not accepted; save the adapter with safetensors: "
            "model.save_pretrained(dir, safe_serialization=True)"
        )
    if not (directory / CONFIG_FILE).is_file():
        raise InvalidArgument(f"{directory} has no {CONFIG_FILE}")
    paths = (directory / CONFIG_FILE, directory / WEIGHTS_FILE)
    return [LocalFile(path, sha256_of(path), path.stat().st_size) for path in paths]


def upload_requests(
    name: str,
    version: str | None,
    files: Sequence[LocalFile],
    on_sent: Callable[[int], None] | None = None,
) -> Iterator[adapters_pb2.UploadAdapterRequest]:
    """The header, then every file's bytes in order; `on_sent(n)` after each chunk is taken."""
    header = adapters_pb2.UploadHeader(
        name=name,
        version=version or "",
        files=[
            adapters_pb2.AdapterFile(filename=f.path.name, sha256=f.sha256, size_bytes=f.size_bytes)
            for f in files
        ],
    )
    yield adapters_pb2.UploadAdapterRequest(header=header)
    for f in files:
        with f.path.open("rb") as stream:
            while data := stream.read(CHUNK_BYTES):
                yield adapters_pb2.UploadAdapterRequest(
                    chunk=adapters_pb2.FileChunk(filename=f.path.name, data=data)
                )
                if on_sent is not None:
                    on_sent(len(data))


def prepare_upload(
    directory: str | Path, name: str, version: str | None, progress: bool | None, stream: TextIO
) -> tuple[Iterator[adapters_pb2.UploadAdapterRequest], ProgressBar | None]:
    """Check and digest the directory, then the request stream and its bar (None: no bar).

    `progress` None shows the bar only when `stream` is a terminal.
    """
    files = adapter_files(directory)
    show = stream.isatty() if progress is None else progress
    bar = ProgressBar(name, sum(f.size_bytes for f in files), stream) if show else None
    requests = upload_requests(name, version, files, on_sent=bar.advance if bar else None)
    return requests, bar


class ProgressBar:
    """One line of text, redrawn in place: `name [#####.....]  42%  1.1/2.6 MiB`."""

    WIDTH = 30

    def __init__(self, label: str, total_bytes: int, stream: TextIO) -> None:
        self.label, self.total, self.stream = label, max(total_bytes, 1), stream
        self.sent = 0

    def advance(self, n: int) -> None:
        self.sent += n
        filled = self.WIDTH * self.sent // self.total
        bar = "#" * filled + "." * (self.WIDTH - filled)
        mib = f"{self.sent / 2**20:.1f}/{self.total / 2**20:.1f} MiB"
        self.stream.write(f"\r{self.label} [{bar}] {100 * self.sent // self.total:3d}%  {mib}")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()
