"""Promise: with --tls-cert / --tls-key the gRPC port (and the HTTP API's, when on) speaks TLS
only, and with --tls-client-ca it also requires a client certificate that CA signed (mTLS).
Certificates are made here with the openssl command (a CA, a server certificate for 127.0.0.1,
a client certificate, and a second CA nobody trusts); nothing reaches the network."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest
from tests.api.server_process import SERVING, free_port, health_status, running_server
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


def tls_server(
    model_dirs, root: Path, certs: Certificates, http_port: int, *extra: str, client_pair=None
):
    keys = keys_file(root / "keys.json", KEYS)
    flags = [
        "--model", str(model_dirs["llama"]), "--device", "cpu", "--api-keys", str(keys),
        "--adapter-dir", str(root / "store"), "--http-port", str(http_port),
        "--served-model-name", "base",
        "--tls-cert", str(certs.server[0]), "--tls-key", str(certs.server[1]), *extra,
    ]  # fmt: skip
    credentials = Certificates.credentials(certs.ca, client_pair)
    return running_server(*flags, log_path=root / "server.log", credentials=credentials)


@dataclass(frozen=True)
class Served:
    address: str  # gRPC
    http_port: int


@pytest.fixture(scope="module")
def tls(model_dirs, certificates, tmp_path_factory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("tls-server")
    http_port = free_port()
    with tls_server(model_dirs, root, certificates, http_port) as (address, _):
        yield Served(address, http_port)


@pytest.fixture(scope="module")
def mtls(model_dirs, certificates, tmp_path_factory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("mtls-server")
    extra = ("--tls-client-ca", str(certificates.ca))
    http_port = free_port()
    server = tls_server(
        model_dirs, root, certificates, http_port, *extra, client_pair=certificates.client
    )
    with server as (address, _):
        yield Served(address, http_port)


def completes(served: Served, scheme: str, ca: Path, pair: tuple[Path, Path] | None = None) -> int:
    """Completion tokens from the OpenAI-compatible API over `scheme`, trusting `ca`."""
    context = ssl.create_default_context(cafile=str(ca))
    if pair is not None:
        context.load_cert_chain(pair[0], pair[1])
    http = openai.DefaultHttpxClient(verify=context)
    api = openai.OpenAI(
        api_key="alpha-key",
        base_url=f"{scheme}://127.0.0.1:{served.http_port}/v1",
        max_retries=0,
        timeout=30,
        http_client=http,
    )
    reply = api.completions.create(model="base", prompt="Over TLS", max_tokens=3)
    return reply.usage.completion_tokens


def generates(address: str, credentials: grpc.ChannelCredentials | None) -> int:
    with Client(address, "alpha-key", timeout=30, retries=0, credentials=credentials) as client:
        return client.generate("Over TLS", max_new_tokens=3).completion_tokens


def test_tls_round_trip_and_no_plaintext(tls, certificates):
    assert generates(tls.address, Certificates.credentials(certificates.ca)) == 3
    with pytest.raises(Unavailable):
        generates(tls.address, None)  # plaintext against a TLS port: no connection
    assert health_status(tls.address) is None
    assert completes(tls, "https", certificates.ca) == 3
    with pytest.raises(openai.APIConnectionError):
        completes(tls, "http", certificates.ca)


def test_mtls_needs_a_client_certificate_from_the_ca(mtls, certificates, capsys):
    assert completes(mtls, "https", certificates.ca, certificates.client) == 3
    for refused in (None, certificates.stranger):
        with pytest.raises(openai.APIConnectionError):
            completes(mtls, "https", certificates.ca, refused)
    address = mtls.address
    assert generates(address, Certificates.credentials(certificates.ca, certificates.client)) == 3
    for refused in (None, certificates.stranger):
        with pytest.raises(Unavailable):
            generates(address, Certificates.credentials(certificates.ca, refused))
    cert, key = certificates.client
    argv = ["health", "--server", address, "--tls-ca", str(certificates.ca),
            "--tls-cert", str(cert), "--tls-key", str(key)]  # fmt: skip
    assert client_main(argv) == 0
    assert "SERVING" in capsys.readouterr().out
    assert health_status(address, credentials=Certificates.credentials(certificates.ca)) is None
    with_client = Certificates.credentials(certificates.ca, certificates.client)
    assert health_status(address, credentials=with_client) == SERVING
