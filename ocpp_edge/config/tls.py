"""TLS contexts for the ``wss`` listeners and the ``mqtts`` uplink; certificate identity.

Stdlib ``ssl`` only, no I/O beyond reading the files named in the configuration, so the
configuration check can build the very contexts the daemon will use and report a bad
certificate, key or CA file against its key and line.

Charge point side (OCPP 1.6 Security Whitepaper ed. 2 §2.1.x / OCPP 2.0.1 Part 2
A00.FR.3xx "Security profiles 2 and 3"):

* TLS 1.2 and 1.3 only (A00.FR.309: TLS 1.2 or higher; SSL and TLS 1.0/1.1 are never
  offered, whatever ``tls_versions`` holds — the configuration check refuses them).
* The cipher suites OCPP requires of a CSMS are available (A00.FR.318):
  TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 and _AES_256_GCM_SHA384 for an ECDSA server
  key, TLS_RSA_WITH_AES_128_GCM_SHA256 and _AES_256_GCM_SHA384 for an RSA one (older
  charge points know nothing else); ECDHE-RSA and ChaCha20 variants are added for
  clients that prefer forward secrecy. TLS 1.3 suites are OpenSSL's defaults.
* No TLS compression (CRIME), no renegotiation, the server's cipher order.
* Profile 3: ``verify = verify_peer`` verifies the client's chain against
  ``cacertfile``; ``fail_if_no_peer_cert`` makes a certificate mandatory in the
  handshake. The certificate is then bound to the charge point id by
  ``auth.peer_identity_problem`` (A00.FR.417: the CN holds the identity).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from ocpp_edge.errors import OcppEdgeError

# OpenSSL names of the suites described above, strongest first.
OCPP_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "AES128-GCM-SHA256", "AES256-GCM-SHA384",
])
TLS_VERSIONS = {"tlsv1.2": ssl.TLSVersion.TLSv1_2, "tlsv1.3": ssl.TLSVersion.TLSv1_3}


class TlsError(OcppEdgeError):
    """A TLS file or setting that cannot be used; ``field`` names the setting."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class TlsSettings:
    certfile: str
    keyfile: str
    cacertfile: str | None
    verify: bool                    # verify_peer: ask for and verify client certificates
    fail_if_no_peer_cert: bool      # with verify: refuse a client without one
    peer_cert_id: str               # "cn" | "dns": where the charge point id must appear
    tls_versions: tuple[str, ...]   # of TLS_VERSIONS
    ciphers: str                    # OpenSSL cipher list for TLS 1.2; "" = OCPP_CIPHERS


def _readable(field: str, path: str | None, what: str) -> None:
    if not path:
        raise TlsError(field, f"{what} is needed")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TlsError(field, f"cannot read {path!r}: {exc.strerror}") from None


def _versions(ctx: ssl.SSLContext, versions: tuple[str, ...]) -> None:
    chosen = sorted(TLS_VERSIONS[v] for v in versions)
    ctx.minimum_version, ctx.maximum_version = chosen[0], chosen[-1]


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The context of one ``wss`` listener; raises TlsError naming the faulty setting."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _versions(ctx, tls.tls_versions)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    try:
        ctx.set_ciphers(tls.ciphers or OCPP_CIPHERS)
    except ssl.SSLError:
        raise TlsError("ciphers", f"OpenSSL knows none of the ciphers {tls.ciphers!r}") \
            from None
    _readable("certfile", tls.certfile, "a server certificate")
    _readable("keyfile", tls.keyfile, "the server certificate's private key")
    try:
        ctx.load_cert_chain(tls.certfile, tls.keyfile)
    except ssl.SSLError as exc:
        field = "keyfile" if "KEY_VALUES_MISMATCH" in str(exc) or "key" in str(exc).lower() \
            else "certfile"
        raise TlsError(field, f"cannot use {tls.certfile!r} with the key {tls.keyfile!r}: "
                       f"{exc.reason or exc}") from None
    if tls.verify:
        _readable("cacertfile", tls.cacertfile, "verify_peer needs the CA that issued the "
                  "charge points' certificates:")
        try:
            ctx.load_verify_locations(cafile=tls.cacertfile)
        except ssl.SSLError as exc:
            raise TlsError("cacertfile", f"{tls.cacertfile!r} holds no usable CA "
                           f"certificate: {exc.reason or exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.fail_if_no_peer_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(cacertfile: str | None, certfile: str | None, keyfile: str | None,
                   verify_hostname: bool) -> ssl.SSLContext:
    """The uplink's context: the broker's chain is always verified (against
    ``cacertfile``, or the system's CAs); its name too unless ``verify_hostname`` is
    off; a client certificate when one is configured."""
    if cacertfile:
        _readable("cacertfile", cacertfile, "a CA file")
    try:
        ctx = ssl.create_default_context(cafile=cacertfile or None)
    except ssl.SSLError as exc:
        raise TlsError("cacertfile", f"{cacertfile!r} holds no usable CA certificate: "
                       f"{exc.reason or exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = verify_hostname
    if certfile:
        _readable("certfile", certfile, "a client certificate")
        if keyfile:
            _readable("keyfile", keyfile, "the client certificate's key")
        try:
            ctx.load_cert_chain(certfile, keyfile or None)
        except ssl.SSLError as exc:
            raise TlsError("keyfile", f"cannot use {certfile!r} with the key "
                           f"{keyfile or certfile!r}: {exc.reason or exc}") from None
    elif keyfile:
        raise TlsError("keyfile", "is set but mqtt.certfile is not")
    return ctx
