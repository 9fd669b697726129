"""A site CA, the gateway's server certificate and charge point client certificates.

Security profiles 2 and 3 need certificates (OCPP 1.6 Security Whitepaper ed. 2,
OCPP 2.0.1 Part 2 A00 "Security profiles"); a site controller on a private network
rarely has a public CA at hand, so ``ocpp-edge cert init`` makes a small one for the
site and ``ocpp-edge cert issue CID`` signs one certificate per charge point with it.

Files ``init`` writes in its directory (default ``/etc/ocpp-edge/tls``, the defaults
of ``ocpp.listener.wss.certfile``/``keyfile``/``cacertfile``):

==============  =====  ======================================================================
``ca.pem``      0644   the site CA certificate: install it on the charge points as the CSMS
                       root (1.6: ``CentralSystemRootCertificate``, 2.0.1:
                       ``CSMSRootCertificate``), and it is the gateway's ``cacertfile``
``ca.key``      0600   the CA's private key: only ``cert issue`` needs it; it may be moved
                       off the controller between issues
``server.pem``  0644   the server certificate followed by ``ca.pem`` (a chain file)
``server.key``  0640   its private key, group of the directory when made as root, so the
                       service (its own user and group) can read it
==============  =====  ======================================================================

``issue`` writes ``<cid>.pem`` (the charge point's certificate, 0644) and ``<cid>.key``
(0600) into its output directory; the charge point needs those two and ``ca.pem``.

Choices:

* ECDSA P-256 with SHA-256 by default: TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 is one
  of the suites OCPP requires of the central system (OCPP 2.0.1 Part 2 and the 1.6
  Security Whitepaper ed. 2; OCTT TC_086_CSMS checks them with the key sizes: RSA 2048
  bits or more, EC 224 or more). ``key_type="rsa"`` (2048 bits or more) is for charge
  points that only do the RSA suites; RSA server keys allow key encipherment, which
  TLS_RSA_WITH_AES_128_GCM_SHA256 needs.
* The client certificate's CN is the charge point id: OCPP puts the charge point's
  identity in the commonName of its certificate, and the gateway binds the TLS peer to
  the id in the URL with it.
* The server certificate names the controller in subjectAltName, DNS names and IP
  addresses (charge points are often configured with an address, not a name): by default
  the machine's host name, ``localhost``, ``127.0.0.1`` and ``::1``, plus those given.
  Its CN is the first host name given (else the machine's): OCTT TC_086_CSMS expects
  the server's FQDN there.
* Validity starts one day in the past: a charge point learns the time from the CSMS
  (BootNotification) only after the TLS handshake, and one whose clock is a few hours
  off would otherwise refuse a certificate made minutes ago.
* Extensions as RFC 5280 and OpenSSL's strict checks want them: BasicConstraints
  (critical), KeyUsage (critical), ExtendedKeyUsage serverAuth or clientAuth,
  SubjectKeyIdentifier and AuthorityKeyIdentifier.

Works with cryptography 38 (Debian bookworm) to the newest; the few accessors that
changed (``not_valid_after`` became ``not_valid_after_utc``) are chosen at run time so
new versions emit no DeprecationWarning.

Tests of the TLS listeners need certificates that are wrong on purpose: the keyword
arguments ``not_before``/``not_after`` (expired or not yet valid), ``common_name`` (a CN
other than the id) and ``dns_names`` serve them, and a second ``init`` in another
directory is an untrusted CA.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ocpp_edge.errors import OcppEdgeError
from ocpp_edge.south.credentials import atomic_write, cid_problem

DEFAULT_DIR = "/etc/ocpp-edge/tls"
CA_DAYS = 3650
CERT_DAYS = 825
KEY_TYPES = ("ec", "rsa")
MIN_RSA_BITS = 2048
BACKDATE = timedelta(days=1)

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.pem", "ca.key", "server.pem", "server.key"

_DNS_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
_DNS_NAME = re.compile(rf"(\*\.)?{_DNS_LABEL}(\.{_DNS_LABEL})*\.?")

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CertToolError(OcppEdgeError):
    """A certificate cannot be made: files in the way, no CA, a bad name or parameter."""


class SiteFiles(NamedTuple):
    ca_cert: str
    ca_key: str
    server_cert: str
    server_key: str


class ClientFiles(NamedTuple):
    cert: str
    key: str


# --- reading certificates, whatever the cryptography version ---------------------------

def not_valid_before(cert: x509.Certificate) -> datetime:
    """Start of validity, timezone-aware UTC, without the newer versions' deprecation."""
    if hasattr(cert, "not_valid_before_utc"):  # cryptography >= 42
        return cert.not_valid_before_utc
    return cert.not_valid_before.replace(tzinfo=UTC)


def not_valid_after(cert: x509.Certificate) -> datetime:
    """End of validity, timezone-aware UTC, without the newer versions' deprecation."""
    if hasattr(cert, "not_valid_after_utc"):  # cryptography >= 42
        return cert.not_valid_after_utc
    return cert.not_valid_after.replace(tzinfo=UTC)


def load_certificates(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    """Every certificate in a PEM file, in order (a chain file: leaf first)."""
    with open(path, "rb") as f:
        data = f.read()
    marker = b"-----BEGIN CERTIFICATE-----"
    blocks = [marker + part for part in data.split(marker)[1:]]
    return [x509.load_pem_x509_certificate(block) for block in blocks]


def common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


# --- names ----------------------------------------------------------------------------

def default_names() -> tuple[list[str], list[str]]:
    """The names a server certificate gets unless told otherwise: (DNS names, addresses)."""
    hostname = socket.gethostname()
    return [n for n in (hostname, "localhost") if n], ["127.0.0.1", "::1"]


def _dns_name(name: str) -> str:
    """A DNS name as it goes into a certificate: ASCII (IDNA A-labels), checked."""
    try:
        ascii_name = name if name.isascii() else name.encode("idna").decode("ascii")
    except UnicodeError:
        raise CertToolError(f"{name!r} is not a valid host name") from None
    if len(ascii_name) > 253 or not _DNS_NAME.fullmatch(ascii_name):
        raise CertToolError(f"{name!r} is not a valid host name")
    return ascii_name.lower()


def _split_names(hostnames: Sequence[str], ips: Sequence[str]
                 ) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """Deduplicated DNS names and addresses, in order; an address given as a host name
    is moved to the addresses (it must be an iPAddress entry to match)."""
    dns: list[str] = []
    addrs: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for name in hostnames:
        try:
            addr = ipaddress.ip_address(name)
        except ValueError:
            checked = _dns_name(name)
            if checked not in dns:
                dns.append(checked)
            continue
        if addr not in addrs:
            addrs.append(addr)
    for text in ips:
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            raise CertToolError(f"{text!r} is not an IP address") from None
        if addr not in addrs:
            addrs.append(addr)
    return dns, addrs


def _name(cn: str, organization: str | None = None) -> x509.Name:
    attrs = []
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization[:64]))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


# --- keys and certificates ------------------------------------------------------------

def generate_key(key_type: str = "ec", rsa_bits: int = MIN_RSA_BITS) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        if rsa_bits < MIN_RSA_BITS:
            raise CertToolError(f"RSA keys of fewer than {MIN_RSA_BITS} bits are refused")
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    raise CertToolError(f"unknown key type {key_type!r} (expected one of {KEY_TYPES})")


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _validity(days: int, not_before: datetime | None, not_after: datetime | None,
              limit: datetime | None = None) -> tuple[datetime, datetime]:
    if not_before is None and not_after is None and days < 1:
        raise CertToolError("the validity must be at least 1 day")
    now = datetime.now(UTC)
    start = not_before if not_before is not None else now - BACKDATE
    if not_after is not None:
        end = not_after
    else:
        end = now + timedelta(days=days)
        if limit is not None and end > limit:
            end = limit  # not beyond the CA: the chain would fail then anyway
    if start.tzinfo is None or end.tzinfo is None:
        raise CertToolError("not_before and not_after must be timezone-aware")
    if end <= start:
        raise CertToolError("the certificate would end before it starts")
    return start, end


def _ski(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


def _key_usage(*, digital_signature=False, key_encipherment=False, key_cert_sign=False,
               crl_sign=False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                         key_encipherment=key_encipherment, data_encipherment=False,
                         key_agreement=False, key_cert_sign=key_cert_sign,
                         crl_sign=crl_sign, encipher_only=False, decipher_only=False)


def make_ca(key: PrivateKey, cn: str, *, days: int = CA_DAYS,
            not_before: datetime | None = None, not_after: datetime | None = None,
            organization: str | None = None) -> x509.Certificate:
    """A self-signed CA certificate that may sign end-entity certificates only."""
    start, end = _validity(days, not_before, not_after)
    name = _name(cn, organization)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (x509.CertificateBuilder()
               .subject_name(name).issuer_name(name)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(_key_usage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True), critical=True)
               .add_extension(ski, critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                   ski), critical=False))
    return builder.sign(key, hashes.SHA256())


def make_leaf(ca_cert: x509.Certificate, ca_key: PrivateKey, key: PrivateKey, cn: str, *,
              server: bool, dns_names: Sequence[str] = (), ips: Sequence[str] = (),
              days: int = CERT_DAYS, not_before: datetime | None = None,
              not_after: datetime | None = None,
              organization: str | None = None) -> x509.Certificate:
    """An end-entity certificate signed by ``ca_cert``: serverAuth or clientAuth."""
    start, end = _validity(days, not_before, not_after, limit=not_valid_after(ca_cert))
    dns, addrs = _split_names(dns_names, ips)
    rsa_key = isinstance(key, rsa.RSAPrivateKey)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder()
               .subject_name(_name(cn, organization)).issuer_name(ca_cert.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                              critical=True)
               .add_extension(_key_usage(digital_signature=True,
                                         key_encipherment=rsa_key and server), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                   _ski(ca_cert)), critical=False))
    if dns or addrs:
        sans = [x509.DNSName(n) for n in dns] + [x509.IPAddress(a) for a in addrs]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


# --- the site directory ---------------------------------------------------------------

def _refuse_existing(paths: Sequence[str], hint: str) -> None:
    existing = [p for p in paths if os.path.lexists(p)]
    if existing:
        verb = "exists" if len(existing) == 1 else "exist"
        raise CertToolError(f"{', '.join(existing)} already {verb}; {hint}")


def _group_of(directory: str) -> int | None:
    """The group private keys readable by the service get: the directory's, as root."""
    return os.stat(directory).st_gid if os.geteuid() == 0 else None


def _make_dir(directory: str, mode: int) -> None:
    """Create ``directory`` (and parents) if missing; as root with its parent's group,
    which is the service's group when the package made the parent."""
    if os.path.isdir(directory):
        return
    parent = os.path.dirname(os.path.abspath(directory))
    _make_dir(parent, 0o755)
    os.mkdir(directory, mode)
    os.chmod(directory, mode)  # whatever the umask
    if os.geteuid() == 0:
        os.chown(directory, -1, os.stat(parent).st_gid)


def load_ca(directory: str | os.PathLike[str]) -> tuple[x509.Certificate, PrivateKey]:
    """The site CA of ``directory`` (``ca.pem``, ``ca.key``)."""
    directory = os.fspath(directory)
    cert_path, key_path = (os.path.join(directory, n) for n in (CA_CERT, CA_KEY))
    if not os.path.exists(cert_path) or not os.path.exists(key_path):
        raise CertToolError(f"no site CA in {directory} ({CA_CERT} and {CA_KEY}): "
                            "run 'ocpp-edge cert init' first")
    try:
        cert = load_certificates(cert_path)[0]
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (ValueError, IndexError, TypeError) as exc:
        raise CertToolError(f"cannot use the CA in {directory}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertToolError(f"{key_path}: only EC and RSA CA keys are supported")
    return cert, key


def init(directory: str | os.PathLike[str] = DEFAULT_DIR, hostnames: Sequence[str] = (),
         ips: Sequence[str] = (), key_type: str = "ec", days: int = CERT_DAYS, *,
         ca_days: int = CA_DAYS, force: bool = False, keep_ca: bool = False,
         include_defaults: bool = True, rsa_bits: int = MIN_RSA_BITS,
         not_before: datetime | None = None, not_after: datetime | None = None,
         organization: str | None = None) -> SiteFiles:
    """Create the site CA and the server certificate in ``directory``.

    Existing files are not overwritten unless ``force``: replacing the CA invalidates
    every client certificate it issued. ``keep_ca`` reuses the existing CA and only
    makes a new server certificate (a renewal, or new names); it too needs ``force`` if
    the server files exist. ``days`` is the server certificate's validity, ``ca_days``
    the CA's; ``not_before``/``not_after`` override the server certificate's validity.
    ``include_defaults=False`` leaves out the machine's host name and the loopback names.
    """
    directory = os.fspath(directory)
    files = SiteFiles(*(os.path.join(directory, n)
                        for n in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)))
    names, addrs = list(hostnames), list(ips)
    if include_defaults:
        default_dns, default_ips = default_names()
        names, addrs = default_dns + names, default_ips + addrs
    dns, ip_objs = _split_names(names, addrs)  # checked before anything is written
    given_dns, _ = _split_names(hostnames, ())
    if not dns and not ip_objs:
        raise CertToolError("the server certificate needs at least one host name or address")
    if not force:
        targets = files[2:] if keep_ca else files
        _refuse_existing(targets, "use --force to replace them" + (
            "" if keep_ca else " (a new CA invalidates every certificate the old one "
            "issued; --keep-ca renews only the server certificate)"))
    key = generate_key(key_type, rsa_bits)
    if keep_ca:
        ca_cert, ca_key = load_ca(directory)
    else:
        _make_dir(directory, 0o755)
        ca_key = generate_key(key_type, rsa_bits)
        host = socket.gethostname() or "site"
        ca_cert = make_ca(ca_key, f"ocpp-edge site CA {host}"[:64], days=ca_days,
                          organization=organization)
    cn = (given_dns or dns or [str(ip_objs[0])])[0]
    server = make_leaf(ca_cert, ca_key, key, cn[:64], server=True, dns_names=dns,
                       ips=[str(a) for a in ip_objs], days=days, not_before=not_before,
                       not_after=not_after, organization=organization)
    if not keep_ca:
        atomic_write(files.ca_key, _key_pem(ca_key), mode=0o600)
        atomic_write(files.ca_cert, _cert_pem(ca_cert), mode=0o644)
    atomic_write(files.server_key, _key_pem(key), mode=0o640, gid=_group_of(directory))
    atomic_write(files.server_cert, _cert_pem(server, ca_cert), mode=0o644)
    return files


def issue(directory: str | os.PathLike[str], cid: str,
          out_dir: str | os.PathLike[str] = ".", key_type: str = "ec",
          days: int = CERT_DAYS, *, common_name: str | None = None,
          dns_names: Sequence[str] = (), force: bool = False, rsa_bits: int = MIN_RSA_BITS,
          not_before: datetime | None = None, not_after: datetime | None = None,
          organization: str | None = None) -> ClientFiles:
    """Issue the security profile 3 certificate of charge point ``cid``.

    CN = ``cid`` unless ``common_name`` says otherwise (only tests should); the files are
    ``<out_dir>/<cid>.pem`` and ``<out_dir>/<cid>.key``. Without ``not_after`` the
    validity is ``days`` but never beyond the CA's. ``dns_names`` adds a subjectAltName,
    for listeners that take the id from there (``peer_cert_id = dns``).
    """
    problem = cid_problem(cid)
    if problem:
        raise CertToolError(problem.replace(" (last path segment)", ""))
    out_dir = os.fspath(out_dir)
    files = ClientFiles(os.path.join(out_dir, f"{cid}.pem"),
                        os.path.join(out_dir, f"{cid}.key"))
    if not force:
        _refuse_existing(files, "use --force to replace them")
    ca_cert, ca_key = load_ca(directory)
    key = generate_key(key_type, rsa_bits)
    cn = cid if common_name is None else common_name
    try:
        cert = make_leaf(ca_cert, ca_key, key, cn, server=False, dns_names=dns_names,
                         days=days, not_before=not_before, not_after=not_after,
                         organization=organization)
    except ValueError as exc:  # e.g. a CN cryptography refuses
        raise CertToolError(str(exc)) from None
    _make_dir(out_dir, 0o700)
    atomic_write(files.key, _key_pem(key), mode=0o600)
    atomic_write(files.cert, _cert_pem(cert), mode=0o644)
    return files
