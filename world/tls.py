"""A test certificate authority for the shapes world's HTTPS server (`capfilt world serve --tls`).

`make_certificates(folder)` writes a CA that exists only on this machine and a server certificate it
signed, valid for 127.0.0.1, the addresses serve_hosts uses (127.0.0.2 and up) and localhost:

    folder/ca.pem           the CA certificate: what a client trusts (download.ca_bundle, SSL_CERT_FILE)
    folder/server.pem       the server certificate, then the CA's (the chain a server sends)
    folder/server-key.pem   the server's private key (ECDSA P-256)

The CA's private key is not kept: nothing else can be signed with it. Nothing here is a secret worth
protecting: the certificates exist to make the loopback server speak TLS as the web does.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

from capfilt.world.server import FIRST_EXTRA_HOST

EXTRA_HOSTS = 254 - 2  # 127.0.0.2 .. 127.0.0.253: every address serve_hosts can use
CA_FILE, CERT_FILE, KEY_FILE = "ca.pem", "server.pem", "server-key.pem"


def default_names() -> tuple[list[str], list[str]]:
    """(IP addresses, DNS names) the world's certificate is valid for."""
    ips = ["127.0.0.1", *(str(FIRST_EXTRA_HOST + i) for i in range(EXTRA_HOSTS))]
    return ips, ["localhost"]


def make_certificates(folder: str | Path, ips: list[str] | None = None, names: list[str] | None = None,
                      days: int = 3650) -> Path:
    """Write ca.pem, server.pem and server-key.pem into folder (made if missing); return folder.
    ips and names: what the server certificate is valid for (default: the world's addresses)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if ips is None and names is None:
        ips, names = default_names()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "capfilt shapes-world test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP256R1())
    alt = [x509.IPAddress(ipaddress.ip_address(a)) for a in ips or []] + [x509.DNSName(n) for n in names or []]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (names or ips or ["server"])[0])])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))

    pem = serialization.Encoding.PEM
    (folder / CA_FILE).write_bytes(ca.public_bytes(pem))
    (folder / CERT_FILE).write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    key_file = folder / KEY_FILE
    key_file.touch(mode=0o600)
    key_file.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return folder


def server_context(folder: str | Path) -> ssl.SSLContext:
    """The server side's TLS context for a folder make_certificates wrote (TLS 1.2 and up)."""
    folder = Path(folder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(folder / CERT_FILE, folder / KEY_FILE)
    return context
