"""Test certificates (a CA and a server certificate it signs, made with `cryptography`), and
the TLS reload on a live server: new handshakes get the new certificate, an established
connection keeps working."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mirror.process import tls

pytestmark = pytest.mark.timeout(60)


@dataclass(frozen=True)
class CertFiles:
    ca_cert: Path
    cert: Path
    key: Path
    serial: int


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def write_ca_and_cert(directory: Path, host: str = "127.0.0.1") -> CertFiles:
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"mirror test CA {os.urandom(4).hex()}")  # distinct CAs, distinct names
    ca = (x509.CertificateBuilder().subject_name(ca_name)
          .issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    serial = x509.random_serial_number()
    cert = (x509.CertificateBuilder().subject_name(_name(host)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = CertFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key",
                      serial)
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return files


def peer_serial(writer: asyncio.StreamWriter) -> int:
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    return await reader.readexactly(length)


async def test_reload_on_a_live_context(tmp_path: Path) -> None:
    first = write_ca_and_cert(tmp_path / "first")
    second = write_ca_and_cert(tmp_path / "second")
    # The live files are replaced in place, as certbot & co do.
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    live_cert.write_bytes(first.cert.read_bytes())
    live_key.write_bytes(first.key.read_bytes())
    ctx = tls.server_context(str(live_cert), str(live_key))

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        client_ctx = ssl.create_default_context()
        for ca in (first.ca_cert, second.ca_cert):
            client_ctx.load_verify_locations(str(ca))
        r1, w1 = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        assert peer_serial(w1) == first.serial
        assert await _get(r1, w1) == b"hello"

        live_cert.write_bytes(second.cert.read_bytes())
        live_key.write_bytes(second.key.read_bytes())
        assert tls.reload(ctx, str(live_cert), str(live_key))

        r2, w2 = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        assert peer_serial(w2) == second.serial  # a new handshake: the new certificate
        assert await _get(r2, w2) == b"hello"
        assert await _get(r1, w1) == b"hello"  # the old connection was not dropped
        for w in (w1, w2):
            w.close()
    finally:
        await runner.cleanup()
