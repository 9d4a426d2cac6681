"""Promise: with --tls-cert / --tls-key the gRPC port speaks TLS only, and with --tls-client-ca
it also requires a client certificate that CA signed (mTLS). Certificates are made here with
the openssl command (a CA, a server certificate for 127.0.0.1, a client certificate, and a
second CA nobody trusts); nothing reaches the network."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from tests.api.server_process import SERVING, health_status, running_server
from tests.reliability.helpers import KEYS, keys_file

from loraserve_client import Client, Unavailable
from loraserve_client.cli import main as client_main

pytestmark = pytest.mark.slow  # server processes of their own


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server: tuple[Path, Path]  # (certificate, key)
    client: tuple[Path, Path]
    stranger: tuple[Path, Path]  # signed by a CA the server does not trust

    @staticmethod
    def credentials(ca: Path, pair: tuple[Path, Path] | None = None) -> grpc.ChannelCredentials:
        if pair is None:
            return grpc.ssl_channel_credentials(ca.read_bytes())
        return grpc.ssl_channel_credentials(
            ca.read_bytes(), pair[1].read_bytes(), pair[0].read_bytes()
        )


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def authority(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}")  # fmt: skip
    return cert, key


def signed(directory: Path, name: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    cert, key, request = (directory / f"{name}{s}" for s in (".pem", ".key", ".csr"))
    extensions = directory / f"{name}.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", key, "-out", request, "-subj", f"/CN={name}")  # fmt: skip
    openssl("x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
            "-out", cert, "-days", "2", "-extfile", extensions)  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Certificates:
    directory = tmp_path_factory.mktemp("tls")
    ca = authority(directory, "test-ca")
    rogue = authority(directory, "rogue-ca")
    return Certificates(
        ca[0],
        signed(directory, "server", ca),
        signed(directory, "client", ca),
        signed(directory, "stranger", rogue),
    )


def tls_server(model_dirs, root: Path, certs: Certificates, *extra: str, client_pair=None):
    keys = keys_file(root / "keys.json", KEYS)
    flags = [
        "--model", str(model_dirs["llama"]), "--device", "cpu", "--api-keys", str(keys),
        "--adapter-dir", str(root / "store"),
        "--tls-cert", str(certs.server[0]), "--tls-key", str(certs.server[1]), *extra,
    ]  # fmt: skip
    credentials = Certificates.credentials(certs.ca, client_pair)
    return running_server(*flags, log_path=root / "server.log", credentials=credentials)


@pytest.fixture(scope="module")
def tls(model_dirs, certificates, tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("tls-server")
    with tls_server(model_dirs, root, certificates) as (address, _):
        yield address


@pytest.fixture(scope="module")
def mtls(model_dirs, certificates, tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mtls-server")
    extra = ("--tls-client-ca", str(certificates.ca))
    server = tls_server(model_dirs, root, certificates, *extra, client_pair=certificates.client)
    with server as (address, _):
        yield address


def generates(address: str, credentials: grpc.ChannelCredentials | None) -> int:
    with Client(address, "alpha-key", timeout=30, retries=0, credentials=credentials) as client:
        return client.generate("Over TLS", max_new_tokens=3).completion_tokens


def test_tls_round_trip_and_no_plaintext(tls, certificates):
    assert generates(tls, Certificates.credentials(certificates.ca)) == 3
    with pytest.raises(Unavailable):
        generates(tls, None)  # plaintext against a TLS port: no connection
    assert health_status(tls) is None


def test_mtls_needs_a_client_certificate_from_the_ca(mtls, certificates, capsys):
    assert generates(mtls, Certificates.credentials(certificates.ca, certificates.client)) == 3
    for refused in (None, certificates.stranger):
        with pytest.raises(Unavailable):
            generates(mtls, Certificates.credentials(certificates.ca, refused))
    cert, key = certificates.client
    argv = ["health", "--server", mtls, "--tls-ca", str(certificates.ca),
            "--tls-cert", str(cert), "--tls-key", str(key)]  # fmt: skip
    assert client_main(argv) == 0
    assert "SERVING" in capsys.readouterr().out
    assert health_status(mtls, credentials=Certificates.credentials(certificates.ca)) is None
    with_client = Certificates.credentials(certificates.ca, certificates.client)
    assert health_status(mtls, credentials=with_client) == SERVING
