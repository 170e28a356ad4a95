"""Certificates and keys for the local control plane.

Called once per state directory by ``cluster.up``: a self-signed CA, the API server's serving
certificate (valid for 127.0.0.1, localhost and the in-cluster service names), client
certificates for the admin, the controller manager, the scheduler, the process node and the API
server's kubelet client, and the RSA key that signs ServiceAccount tokens. Existing files are kept,
so restarting a cluster keeps its identities and issued tokens valid.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=3650)


@dataclass(frozen=True)
class ClientIdentity:
    """A client certificate's file stem, user name (CN) and groups (O)."""

    stem: str
    user: str
    groups: tuple[str, ...] = ()


ADMIN = ClientIdentity("admin", "finetune-dev-admin", ("system:masters",))
CONTROLLER_MANAGER = ClientIdentity("controller-manager", "system:kube-controller-manager")
SCHEDULER = ClientIdentity("scheduler", "system:kube-scheduler")
NODE_AGENT = ClientIdentity("node-agent", "finetune-dev-node-agent", ("system:masters",))
KUBELET_CLIENT = ClientIdentity(
    "apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",)
)
CLIENTS = (ADMIN, CONTROLLER_MANAGER, SCHEDULER, NODE_AGENT, KUBELET_CLIENT)

SERVING_DNS = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
SERVING_IPS = ("127.0.0.1", "10.0.0.1")


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _name(common_name: str, groups: tuple[str, ...] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: rsa.RSAPublicKey) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def ensure(pki_dir: Path, *, extra_ips: tuple[str, ...] = ()) -> None:
    """Create every certificate and key under ``pki_dir`` that does not exist yet.

    ``extra_ips`` are added to the API server certificate (the in-cluster service address).
    """
    pki_dir.mkdir(parents=True, exist_ok=True)
    ca_cert_path, ca_key_path = pki_dir / "ca.crt", pki_dir / "ca.key"
    if not ca_cert_path.exists():
        ca_key = _key()
        name = _name("finetune-dev-ca")
        cert = (
            _builder(name, name, ca_key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write_key(ca_key_path, ca_key)
        ca_cert_path.write_bytes(_pem(cert))
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    assert isinstance(loaded, rsa.RSAPrivateKey)
    ca_key = loaded

    def issue(
        stem: str, subject: x509.Name, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]
    ) -> None:
        if (pki_dir / f"{stem}.crt").exists():
            return
        key = _key()
        builder = _builder(subject, ca_cert.subject, key.public_key()).add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        _write_key(pki_dir / f"{stem}.key", key)
        (pki_dir / f"{stem}.crt").write_bytes(_pem(builder.sign(ca_key, hashes.SHA256())))

    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in SERVING_DNS]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in (*SERVING_IPS, *extra_ips)]
    issue("apiserver", _name("kube-apiserver"), ExtendedKeyUsageOID.SERVER_AUTH, sans)
    node_sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    issue("kubelet-serving", _name("process-node"), ExtendedKeyUsageOID.SERVER_AUTH, node_sans)
    for client in CLIENTS:
        issue(client.stem, _name(client.user, client.groups), ExtendedKeyUsageOID.CLIENT_AUTH, [])

    sa_key = pki_dir / "service-account.key"
    if not sa_key.exists():
        key = _key()
        _write_key(sa_key, key)
        (pki_dir / "service-account.pub").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def serving_certificate(pki_dir: Path, directory: Path, *, common_name: str, ips: tuple[str, ...]) -> Path:
    """A serving certificate signed by the cluster's CA, valid for ``ips``, written to
    ``directory`` as tls.crt / tls.key (the layout controller-runtime webhook servers read).

    For servers the API server calls back (admission webhooks run as local processes, e.g.
    Kueue's): their webhook configuration's caBundle is the cluster's ca.crt. Returns ``directory``.
    """
    ca_cert = x509.load_pem_x509_certificate((pki_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, rsa.RSAPrivateKey)
    key = _key()
    sans = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        _builder(_name(common_name), ca_cert.subject, key.public_key())
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    _write_key(directory / "tls.key", key)
    (directory / "tls.crt").write_bytes(_pem(cert))
    return directory
