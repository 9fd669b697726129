#!/usr/bin/python3
"""Run by packaging/deb-test under the sandbox of ocpp-edge.service (the same
[Service] settings, MemoryDenyWriteExecute=yes and the system-call filter among them):
python3-cryptography makes keys and certificates, encrypts and loads a key with a
password callback, and the ssl module completes a TLS handshake with them on loopback.
If cffi or OpenSSL needed writable+executable memory, or a system call outside the
filter, this would die here instead of in the daemon. Prints "tlsprobe: ok" at the end.
"""

import datetime
import os
import socket
import ssl
import subprocess
import tempfile
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def make_cert(key, name: str, issuer_key=None, issuer_name=None, ca=False):
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer_name or subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


ca_key = ec.generate_private_key(ec.SECP256R1())
ca = make_cert(ca_key, "deb-test CA", ca=True)
srv_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
srv = make_cert(srv_key, "localhost", ca_key, ca.subject)
print("tlsprobe: EC and RSA keys, CA and server certificate made", flush=True)

tmp = tempfile.mkdtemp()  # PrivateTmp=yes: a /tmp of the service's own
pem = lambda obj: obj.public_bytes(serialization.Encoding.PEM)  # noqa: E731
with open(os.path.join(tmp, "ca.pem"), "wb") as f:
    f.write(pem(ca))
with open(os.path.join(tmp, "server.pem"), "wb") as f:
    f.write(pem(srv))
with open(os.path.join(tmp, "server.key"), "wb") as f:
    f.write(srv_key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(b"s3cret")))
with open(os.path.join(tmp, "server.key"), "rb") as f:
    loaded = serialization.load_pem_private_key(f.read(), password=b"s3cret")
assert loaded.private_numbers() == srv_key.private_numbers()
print("tlsprobe: encrypted key written and loaded again", flush=True)

server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
server_ctx.load_cert_chain(os.path.join(tmp, "server.pem"), os.path.join(tmp, "server.key"),
                           password=lambda: "s3cret")  # OpenSSL calls back into Python
client_ctx = ssl.create_default_context(cafile=os.path.join(tmp, "ca.pem"))

listener = socket.create_server(("127.0.0.1", 0))
port = listener.getsockname()[1]


def serve():
    conn, _ = listener.accept()
    with server_ctx.wrap_socket(conn, server_side=True) as tls:
        tls.sendall(tls.recv(100).upper())


thread = threading.Thread(target=serve)
thread.start()
with socket.create_connection(("127.0.0.1", port)) as raw, \
        client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
    tls.sendall(b"ping")
    assert tls.recv(100) == b"PING"
    peer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    version = tls.version()
thread.join()
cn = peer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
print(f"tlsprobe: {version} handshake on loopback, peer certificate CN={cn}", flush=True)

out = subprocess.run(["getent", "ahosts", "localhost"], capture_output=True, text=True,
                     check=True).stdout.split()[0]
print(f"tlsprobe: getent ahosts localhost -> {out} (fork and exec allowed)", flush=True)
print("tlsprobe: ok", flush=True)
