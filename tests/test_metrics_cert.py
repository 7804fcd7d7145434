"""The self-signed certificate of the metrics endpoint, made by the native core with OpenSSL's
libcrypto: read back by the openssl program (the oracle) and by Python's ssl module."""

from __future__ import annotations

import datetime
import os
import re
import ssl
import stat
import subprocess
from pathlib import Path

import pytest

from cdimover._native import self_signed_cert
from cdimover.pod.metrics import self_signed_certificate
from conftest import need_tool


def openssl(*args: str, stdin: bytes | None = None) -> str:
    return subprocess.run([need_tool("openssl"), *args], input=stdin, capture_output=True,
                          check=True).stdout.decode()


def validity_time(text: str, field: str) -> datetime.datetime:
    m = re.search(rf"{field}\s*:\s*(\w+\s+\d+ \d+:\d+:\d+ \d+) GMT", text)
    assert m is not None, text
    return datetime.datetime.strptime(re.sub(r"\s+", " ", m[1]), "%b %d %H:%M:%S %Y").replace(
        tzinfo=datetime.timezone.utc)


def test_metrics_certificate_as_openssl_reads_it(tmp_path: Path) -> None:
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    certfile, keyfile = self_signed_certificate(str(tmp_path), days=30)
    after = datetime.datetime.now(datetime.timezone.utc)
    assert (certfile, keyfile) == (str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"))
    for f in (certfile, keyfile):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    text = openssl("x509", "-in", certfile, "-noout", "-text")
    assert "Version: 3 (0x2)" in text
    assert re.search(r"Subject: CN ?= ?cdimover-metrics\n", text)
    assert re.search(r"Issuer: CN ?= ?cdimover-metrics\n", text)
    assert "Signature Algorithm: ecdsa-with-SHA256" in text
    assert "NIST CURVE: P-256" in text
    assert re.search(r"DNS:localhost, IP Address:127\.0\.0\.1, IP Address:0:0:0:0:0:0:0:1", text)
    assert re.search(r"Basic Constraints: critical\s+CA:FALSE", text)
    start, end = validity_time(text, "Not Before"), validity_time(text, "Not After ")
    assert before - datetime.timedelta(minutes=5, seconds=1) <= start <= after
    assert end - start == datetime.timedelta(days=30, minutes=5)
    # The signature holds (self-signed: the certificate verifies against itself).
    openssl("verify", "-CAfile", certfile, "-partial_chain", certfile)
    # The key is the certificate's, in PKCS #8.
    assert Path(keyfile).read_text().startswith("-----BEGIN PRIVATE KEY-----\n")
    assert openssl("pkey", "-in", keyfile, "-pubout") == openssl("x509", "-in", certfile,
                                                                 "-noout", "-pubkey")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile, keyfile)


def test_every_certificate_is_new(tmp_path: Path) -> None:
    (a_cert, a_key), (b_cert, b_key) = (self_signed_cert("x", ("DNS:a",), 1) for _ in range(2))
    assert a_key != b_key
    serials = {openssl("x509", "-noout", "-serial", stdin=c) for c in (a_cert, b_cert)}
    assert len(serials) == 2
    for s in serials:   # positive, 16 bytes, not zero
        m = re.fullmatch(r"serial=([0-9A-F]{32})\n", s)
        assert m is not None and 0x40 <= int(m[1][:2], 16) <= 0x7F, s
    # Without names: no subjectAltName extension at all.
    bare, _ = self_signed_cert("bare", (), 1)
    assert "Subject Alternative Name" not in openssl("x509", "-noout", "-text", stdin=bare)


@pytest.mark.parametrize("args, message", [
    (("", ("DNS:a",), 1), "common name '': 1 to 64 bytes"),
    (("n" * 65, ("DNS:a",), 1), "1 to 64 bytes"),
    (("é" * 33, ("DNS:a",), 1), "1 to 64 bytes"),        # 66 bytes in UTF-8
    (("n", ("DNS:a",), 0), "0 days of validity: 1 to 36500"),
    (("n", ("DNS:a",), 36501), "36501 days of validity"),
    (("n", ("DNS:a,IP:1.2.3.4",), 1), "'DNS:a,IP:1.2.3.4': expected DNS:name or IP:address"),
    (("n", ("URI:http://x",), 1), "expected DNS:name or IP:address"),
    (("n", ("DNS:",), 1), "expected DNS:name or IP:address"),
    (("n", ("IP:not-an-address",), 1), "expected DNS:name or IP:address"),
    (("n", ("IP:1.2.3.256",), 1), "expected DNS:name or IP:address"),
])
def test_bad_arguments_are_refused(args: tuple[str, tuple[str, ...], int], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        self_signed_cert(*args)


def test_the_core_refuses_what_openssl_cannot_encode() -> None:
    # Names past the Python checks (over 1024 bytes in all) are refused by the core itself.
    with pytest.raises(OSError, match="subject alternative names over 1024 bytes"):
        self_signed_cert("n", ("DNS:" + "a" * 60,) * 20, 1)
