"""Certificates for the TLS tests, made with the ``openssl`` command (a CA, a server, clients)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass
class Pki:
    """A CA and the certificates it signed, as files in ``path``."""

    path: Path

    @property
    def ca(self) -> Path:
        return self.path / "ca.crt"

    def cert(self, name: str) -> Path:
        return self.path / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.path / f"{name}.key"

    def make_ca(self, name: str = "ca", subject: str = "/CN=Distributex test CA") -> None:
        _openssl(
            "req", "-x509", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.crt",
            "-days", "2", "-subj", subject,
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=self.path,
        )  # fmt: skip

    def issue(
        self,
        name: str,
        cn: str,
        sans: list[str] | None = None,
        ca: str = "ca",
        client: bool = True,
        usage: str | None = None,
    ) -> None:
        """A leaf certificate ``name``.crt/.key with CN ``cn`` and SANs, signed by ``ca``.

        ``usage``: its extended key usage (default: clientAuth, or serverAuth if not ``client``).
        """
        ext = self.path / f"{name}.ext"
        lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature"]
        usage = usage or ("clientAuth" if client else "serverAuth")
        lines.append(f"extendedKeyUsage={usage}")
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n")
        _openssl(
            "req", "-new", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={cn}", cwd=self.path,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", ext.name,
            cwd=self.path,
        )  # fmt: skip


def make_pki(path: Path) -> Pki:
    """The test PKI: a CA; a server certificate for localhost and 127.0.0.1; clients
    ``web1`` (CN web1, DNS SAN web1.example.com), ``db1``; a foreign CA and its ``web1``;
    a server certificate for another name (``elsewhere.example``)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (scripts/test.sh installs it)")
    path.mkdir(parents=True, exist_ok=True)
    pki = Pki(path)
    pki.make_ca()
    pki.issue("server", "localhost", ["DNS:localhost", "IP:127.0.0.1"], client=False)
    pki.issue("other-server", "elsewhere.example", ["DNS:elsewhere.example"], client=False)
    pki.issue("web1", "web1", ["DNS:web1.example.com"])
    pki.issue("db1", "db1")
    pki.make_ca("foreign-ca", "/CN=Someone else's CA")
    pki.issue("foreign-web1", "web1", ca="foreign-ca")
    return pki
