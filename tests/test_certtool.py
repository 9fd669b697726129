"""The site CA, server and client certificates: contents, files, OpenSSL's strict
verification, and real TLS handshakes (Python's ssl) with what the tool makes."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
import subprocess
import threading
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from ocpp_edge.tools import cert as certtool
from ocpp_edge.tools.cert import CertToolError, init, issue, load_certificates, not_valid_after


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One EC site (CA + server certificate) and one RSA site, made once."""
    base = tmp_path_factory.mktemp("sites")
    return {kind: init(base / kind, ["gw.example", "10.1.2.3"], ["fd00::5"], key_type=kind)
            for kind in ("ec", "rsa")}


def ext(cert, cls):
    return cert.extensions.get_extension_for_class(cls)


def openssl_verify(ca, cert, purpose):
    r = subprocess.run(["openssl", "verify", "-x509_strict", "-purpose", purpose,
                        "-CAfile", str(ca), str(cert)], capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


def signed_by(cert, ca):
    """The signature check itself, independent of OpenSSL's command line."""
    key = ca.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                   cert.signature_hash_algorithm)
    else:
        key.verify(cert.signature, cert.tbs_certificate_bytes,
                   ec.ECDSA(cert.signature_hash_algorithm))
    return cert.issuer == ca.subject


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# --- init -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_init_writes_ca_and_server_chain(site, kind):
    files = site[kind]
    assert [os.path.basename(p) for p in files] == ["ca.pem", "ca.key", "server.pem",
                                                    "server.key"]
    assert (mode(files.ca_cert), mode(files.ca_key), mode(files.server_cert),
            mode(files.server_key)) == (0o644, 0o600, 0o644, 0o640)
    [ca] = load_certificates(files.ca_cert)
    server, chained_ca = load_certificates(files.server_cert)
    assert chained_ca == ca
    assert signed_by(server, ca) and signed_by(ca, ca)
    bc = ext(ca, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    assert ext(ca, x509.KeyUsage).value.key_cert_sign
    assert not ext(server, x509.BasicConstraints).value.ca
    assert list(ext(server, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ext(server, x509.AuthorityKeyIdentifier).value.key_identifier == \
        ext(ca, x509.SubjectKeyIdentifier).value.digest
    usage = ext(server, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    # TLS_RSA_* suites (OCPP's for RSA) encrypt the premaster secret with the server key.
    assert usage.value.key_encipherment == (kind == "rsa")
    if kind == "ec":
        assert isinstance(server.public_key(), ec.EllipticCurvePublicKey)
        assert server.public_key().curve.name == "secp256r1"
    else:
        assert server.public_key().key_size == 2048


def test_server_names_defaults_and_given(site, tmp_path):
    server = load_certificates(site["ec"].server_cert)[0]
    san = ext(server, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [socket.gethostname().lower(),
                                                     "localhost", "gw.example"]
    # "10.1.2.3" was given as a host name: it must be an iPAddress entry to match.
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.1.2.3", "fd00::5")}
    assert len(san.get_values_for_type(x509.IPAddress)) == 4
    # The CN is the first host name given (OCTT TC_086_CSMS: the server's FQDN).
    assert certtool.common_name(server) == "gw.example"
    only_defaults = load_certificates(init(tmp_path / "d", ips=["10.9.9.9"]).server_cert)[0]
    assert certtool.common_name(only_defaults) == socket.gethostname().lower()


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_openssl_strict_verification(site, kind, tmp_path):
    files = site[kind]
    code, out = openssl_verify(files.ca_cert, files.server_cert, "sslserver")
    assert code == 0, out
    client = issue(os.path.dirname(files.ca_cert), "CP-1", tmp_path, key_type=kind)
    code, out = openssl_verify(files.ca_cert, client.cert, "sslclient")
    assert code == 0, out
    # The purposes are real: a client certificate is no server certificate.
    code, out = openssl_verify(files.ca_cert, client.cert, "sslserver")
    assert code != 0 and "unsuitable certificate purpose" in out


def test_init_refuses_to_overwrite(tmp_path):
    first = init(tmp_path / "tls", include_defaults=False, hostnames=["a.example"])
    ca_before = open(first.ca_cert, "rb").read()
    with pytest.raises(CertToolError, match="already exist.*--force"):
        init(tmp_path / "tls", hostnames=["b.example"])
    assert open(first.ca_cert, "rb").read() == ca_before
    # --keep-ca: a new server certificate from the same CA, only with force.
    with pytest.raises(CertToolError, match="server.pem, .*server.key already exist"):
        init(tmp_path / "tls", hostnames=["b.example"], keep_ca=True)
    init(tmp_path / "tls", hostnames=["b.example"], keep_ca=True, force=True)
    assert open(first.ca_cert, "rb").read() == ca_before
    server = load_certificates(first.server_cert)[0]
    assert "b.example" in ext(server, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    assert signed_by(server, load_certificates(first.ca_cert)[0])
    init(tmp_path / "tls", hostnames=["c.example"], force=True)
    assert open(first.ca_cert, "rb").read() != ca_before


def test_server_key_gets_the_directory_group(tmp_path):
    parent = tmp_path / "etc"
    parent.mkdir()
    if os.geteuid() == 0:
        os.chown(parent, -1, 4343)
    files = init(parent / "tls", hostnames=["gw"], include_defaults=False)
    expected = 4343 if os.geteuid() == 0 else os.getegid()
    assert os.stat(parent / "tls").st_gid == expected
    assert os.stat(files.server_key).st_gid == expected


@pytest.mark.parametrize("kwargs, why", [
    ({"hostnames": ["bad name"]}, "not a valid host name"),
    ({"ips": ["10.0.0.300"]}, "not an IP address"),
    ({"key_type": "dsa"}, "unknown key type"),
    ({"key_type": "rsa", "rsa_bits": 1024}, "fewer than 2048 bits"),
    ({"days": 0}, "at least 1 day"),
    ({"include_defaults": False}, "at least one host name"),
])
def test_init_refuses_bad_parameters_before_writing(tmp_path, kwargs, why):
    with pytest.raises(CertToolError, match=why):
        init(tmp_path / "tls", **kwargs)
    assert not (tmp_path / "tls").exists() or os.listdir(tmp_path / "tls") == []


def test_server_validity_is_days_from_a_day_ago(tmp_path):
    files = init(tmp_path / "tls", days=30, hostnames=["gw"])
    server = load_certificates(files.server_cert)[0]
    now = datetime.now(UTC)
    assert abs(not_valid_after(server) - (now + timedelta(days=30))) < timedelta(minutes=5)
    assert abs(certtool.not_valid_before(server) - (now - timedelta(days=1))) < \
        timedelta(minutes=5)
    ca = load_certificates(files.ca_cert)[0]
    assert abs(not_valid_after(ca) - (now + timedelta(days=3650))) < timedelta(minutes=5)


# --- issue ----------------------------------------------------------------------------

def test_issue_client_certificate(site, tmp_path):
    ca_dir = os.path.dirname(site["ec"].ca_cert)
    files = issue(ca_dir, "CP:0001 é", tmp_path / "out", days=90)
    assert files == (str(tmp_path / "out" / "CP:0001 é.pem"),
                     str(tmp_path / "out" / "CP:0001 é.key"))
    assert (mode(files.cert), mode(files.key), mode(tmp_path / "out")) == (0o644, 0o600, 0o700)
    [cert] = load_certificates(files.cert)
    assert certtool.common_name(cert) == "CP:0001 é"
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert signed_by(cert, load_certificates(site["ec"].ca_cert)[0])
    now = datetime.now(UTC)
    assert abs(not_valid_after(cert) - (now + timedelta(days=90))) < timedelta(minutes=5)
    with pytest.raises(x509.ExtensionNotFound):
        ext(cert, x509.SubjectAlternativeName)


def test_issue_never_outlives_the_ca_unless_told(tmp_path):
    files = init(tmp_path / "tls", hostnames=["gw"], ca_days=10)
    ca = load_certificates(files.ca_cert)[0]
    cert = load_certificates(issue(tmp_path / "tls", "CP1", tmp_path).cert)[0]
    assert not_valid_after(cert) == not_valid_after(ca)
    later = datetime.now(UTC) + timedelta(days=400)
    odd = issue(tmp_path / "tls", "CP2", tmp_path, not_after=later)
    assert abs(not_valid_after(load_certificates(odd.cert)[0]) - later) < timedelta(seconds=1)


def test_issue_special_certificates_for_tests(site, tmp_path):
    ca_dir = os.path.dirname(site["ec"].ca_cert)
    past = datetime(2020, 1, 1, tzinfo=UTC)
    expired = issue(ca_dir, "CP-old", tmp_path, not_before=past,
                    not_after=past + timedelta(days=1))
    cert = load_certificates(expired.cert)[0]
    assert not_valid_after(cert) == past + timedelta(days=1)
    code, out = openssl_verify(site["ec"].ca_cert, expired.cert, "sslclient")
    assert code != 0 and "expired" in out
    other = issue(ca_dir, "CP-B", tmp_path, common_name="CP-A", dns_names=["CP-B"])
    cert = load_certificates(other.cert)[0]
    assert certtool.common_name(cert) == "CP-A"
    assert ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["cp-b"]


def test_issue_refusals(site, tmp_path):
    ca_dir = os.path.dirname(site["ec"].ca_cert)
    for cid in ("a/b", "x" * 49, "", "a#b"):
        with pytest.raises(CertToolError):
            issue(ca_dir, cid, tmp_path)
    with pytest.raises(CertToolError, match="no site CA in .*cert init"):
        issue(tmp_path / "nothing", "CP1", tmp_path)
    issue(ca_dir, "CP1", tmp_path)
    before = open(tmp_path / "CP1.key", "rb").read()
    with pytest.raises(CertToolError, match="already exist.*--force"):
        issue(ca_dir, "CP1", tmp_path)
    assert open(tmp_path / "CP1.key", "rb").read() == before
    issue(ca_dir, "CP1", tmp_path, force=True)
    assert open(tmp_path / "CP1.key", "rb").read() != before


# --- real TLS handshakes --------------------------------------------------------------

def handshake(server_files, ca_file, client_files=None, *, server_hostname="localhost",
              version=None, cipher=None):
    """A TLS handshake over a socket pair: the gateway-like server verifies client
    certificates against the site CA; the charge point-like client verifies the server.
    Returns (server error, client error, client certificate as the server saw it)."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server_files.server_cert, server_files.server_key)
    server_ctx.load_verify_locations(ca_file)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(ca_file)
    if client_files is not None:
        client_ctx.load_cert_chain(client_files.cert, client_files.key)
    for ctx in (server_ctx, client_ctx):
        if version is not None:
            ctx.minimum_version = ctx.maximum_version = version
        if cipher is not None:
            ctx.set_ciphers(cipher)
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    result = {}

    def serve():
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                result["peer"] = s.getpeercert()
                result["cipher"] = s.cipher()[0]
                s.sendall(b"ok")
                s.recv(1)
        except (OSError, ssl.SSLError) as exc:
            result["server"] = exc
        finally:
            a.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=server_hostname) as c:
            if c.recv(2) != b"ok":  # TLS 1.3: a refused client certificate shows here
                raise ConnectionError("no data: the server closed the connection")
            c.sendall(b"x")
    except (OSError, ssl.SSLError) as exc:
        result["client"] = exc
    finally:
        b.close()
        thread.join(15)
    return result.get("server"), result.get("client"), result


def peer_cn(peer):
    return dict(x[0] for x in peer["subject"])["commonName"]


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_tls_handshake_with_client_certificate(site, kind, tmp_path):
    files = site[kind]
    client = issue(os.path.dirname(files.ca_cert), "CP-7", tmp_path, key_type=kind)
    server_err, client_err, result = handshake(files, files.ca_cert, client)
    assert server_err is None and client_err is None
    assert peer_cn(result["peer"]) == "CP-7"


@pytest.mark.parametrize("kind, cipher", [
    ("ec", "ECDHE-ECDSA-AES128-GCM-SHA256"),  # TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
    ("rsa", "AES128-GCM-SHA256"),             # TLS_RSA_WITH_AES_128_GCM_SHA256
])
def test_ocpp_required_tls12_suites_work(site, kind, cipher, tmp_path):
    files = site[kind]
    client = issue(os.path.dirname(files.ca_cert), "CP-8", tmp_path, key_type=kind)
    server_err, client_err, result = handshake(files, files.ca_cert, client,
                                               version=ssl.TLSVersion.TLSv1_2, cipher=cipher)
    assert server_err is None and client_err is None
    assert result["cipher"] == cipher


@pytest.mark.parametrize("name", ["127.0.0.1", "::1", "10.1.2.3", "fd00::5", "gw.example"])
def test_charge_point_verifies_server_by_name_or_address(site, name, tmp_path):
    files = site["ec"]
    client = issue(os.path.dirname(files.ca_cert), "CP-9", tmp_path)
    server_err, client_err, _ = handshake(files, files.ca_cert, client,
                                          server_hostname=name)
    assert server_err is None and client_err is None


def test_wrong_server_name_is_refused(site, tmp_path):
    files = site["ec"]
    client = issue(os.path.dirname(files.ca_cert), "CP-9", tmp_path)
    _, client_err, _ = handshake(files, files.ca_cert, client, server_hostname="other.example")
    assert isinstance(client_err, ssl.SSLCertVerificationError)
    assert "Hostname mismatch" in str(client_err)


def test_untrusted_client_certificate_is_refused(site, tmp_path):
    stranger = init(tmp_path / "other-site", hostnames=["x"], include_defaults=False)
    client = issue(os.path.dirname(stranger.ca_cert), "CP-7", tmp_path)
    files = site["ec"]
    server_err, _, result = handshake(files, files.ca_cert, client)
    assert isinstance(server_err, ssl.SSLError)
    assert "certificate verify failed" in str(server_err)
    assert "unable to get local issuer certificate" in server_err.verify_message


def test_expired_client_certificate_is_refused(site, tmp_path):
    files = site["ec"]
    past = datetime.now(UTC) - timedelta(days=10)
    client = issue(os.path.dirname(files.ca_cert), "CP-7", tmp_path, not_before=past,
                   not_after=past + timedelta(days=1))
    server_err, _, _ = handshake(files, files.ca_cert, client)
    assert isinstance(server_err, ssl.SSLCertVerificationError)
    assert server_err.verify_message == "certificate has expired"


def test_server_certificate_is_no_client_certificate(site):
    files = site["ec"]
    as_client = certtool.ClientFiles(files.server_cert, files.server_key)
    server_err, _, _ = handshake(files, files.ca_cert, as_client)
    assert isinstance(server_err, ssl.SSLCertVerificationError)
    assert server_err.verify_message == "unsuitable certificate purpose"
