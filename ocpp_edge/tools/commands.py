"""``ocpp-edge passwd`` and ``ocpp-edge cert``: charge point passwords and certificates.

Exit codes: 0 done, 1 failure (one line on stderr saying why), 2 usage error.
Results meant for scripts (a generated key, the files written) go to stdout, everything
else to stderr.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import sys
from collections.abc import Sequence

from ocpp_edge.errors import OcppEdgeError
from ocpp_edge.south.credentials import DEFAULT_PASSWORD_FILE

DEFAULT_CONFIG = "/etc/ocpp-edge.conf"
PASSWORD_FILE_KEY = "auth.password_file"
GENERATED_BYTES = 20  # OCPP 1.6 AuthorizationKey: at most 20 bytes, as 40 hex digits

PASSWD_HELP = f"""\
what the charge point must be configured with:
  It connects with HTTP Basic authentication: user name = its id (CID), password = the
  key. The password file stores the key exactly as given here.

  --generate  makes a random 20-byte key and prints it as 40 hexadecimal digits.
              Those 40 characters are the key, and what the file stores:
              configure them as the OCPP 1.6 AuthorizationKey (e.g. with
              ChangeConfiguration), as OCPP 2.0.1 SecurityCtrlr.BasicAuthPassword, or
              in the password field of the charge point's set-up page. A 1.6 charge
              point that decodes AuthorizationKey and sends the 20 raw bytes instead
              (OCPP 1.6 Security Whitepaper ed. 2; OCTT TC_085_CS) is accepted too: the
              gateway also tries the hexadecimal form of a 20-byte binary password.
  (default)   reads the key from standard input: exactly the bytes the charge point
              sends, one trailing newline removed; asked twice, without echo, on a
              terminal. OCPP asks for 16 to 20 bytes (1.6) or 16 to 40 characters (2.0.1).

The password file is {PASSWORD_FILE_KEY} of the configuration file (--config), unless
--file names it. The gateway reads it at start and when it reloads.
"""


class _Usage(Exception):
    """A command line that cannot be run: exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would exit; main() decides
        self.print_usage(sys.stderr)
        raise _Usage(f"{self.prog}: error: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ocpp-edge", description="Charge point passwords and certificates.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    pw = sub.add_parser("passwd", help="add, change or delete a charge point's password",
                        description="Add or change the password of charge point CID in "
                                    "the password file, or delete it.",
                        epilog=PASSWD_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pw.add_argument("cid", metavar="CID", help="the charge point id, as in its URL "
                    "(percent-decoded)")
    pw.add_argument("--config", "-c", metavar="FILE", help=f"configuration file to take "
                    f"{PASSWORD_FILE_KEY} from (default: {DEFAULT_CONFIG})")
    pw.add_argument("--file", "-f", metavar="PASSWORDFILE",
                    help="the password file (instead of the configuration's)")
    how = pw.add_mutually_exclusive_group()
    how.add_argument("--generate", "-g", action="store_true",
                     help="generate a random key and print it (see below)")
    how.add_argument("--delete", "-d", action="store_true", help="delete the entry")

    cert = sub.add_parser("cert", help="site CA, server and charge point certificates")
    csub = cert.add_subparsers(dest="cert_command", required=True, parser_class=_Parser)
    from ocpp_edge.tools.cert import CERT_DAYS, DEFAULT_DIR

    init = csub.add_parser(
        "init", help="create the site CA and the gateway's server certificate",
        description="Create the site CA (ca.pem, ca.key) and the server certificate "
                    "(server.pem: certificate and CA; server.key) in DIR. The server "
                    "certificate names this machine's host name, localhost, 127.0.0.1, "
                    "::1 and every --host and --ip: give every name and address the "
                    "charge points use to reach the gateway. Install ca.pem on the charge "
                    "points as the CSMS root certificate.")
    init.add_argument("--dir", default=DEFAULT_DIR, help=f"(default: {DEFAULT_DIR})")
    init.add_argument("--host", action="append", default=[], metavar="NAME",
                      help="a DNS name for the server certificate (repeatable); the "
                           "first is also its CN: the FQDN the charge points use")
    init.add_argument("--ip", action="append", default=[], metavar="ADDR",
                      help="an IP address for the server certificate (repeatable)")
    init.add_argument("--rsa", action="store_true",
                      help="RSA 2048 keys instead of ECDSA P-256, for charge points "
                           "without ECDSA")
    init.add_argument("--days", type=int, default=CERT_DAYS,
                      help=f"validity of the server certificate (default: {CERT_DAYS})")
    init.add_argument("--force", action="store_true",
                      help="replace existing files (a new CA invalidates every charge point "
                           "certificate the old one issued)")
    init.add_argument("--keep-ca", action="store_true",
                      help="keep the existing CA; make only a new server certificate")

    issue = csub.add_parser(
        "issue", help="issue a charge point's client certificate (security profile 3)",
        description="Issue the client certificate of charge point CID (CN = CID), signed "
                    "by the site CA: writes CID.pem and CID.key in the output directory. "
                    "The charge point needs both, and ca.pem.")
    issue.add_argument("cid", metavar="CID", help="the charge point id")
    issue.add_argument("--dir", default=DEFAULT_DIR,
                       help=f"where the site CA is (default: {DEFAULT_DIR})")
    issue.add_argument("--out-dir", default=".", help="(default: the current directory)")
    issue.add_argument("--rsa", action="store_true", help="an RSA 2048 key instead of "
                       "ECDSA P-256")
    issue.add_argument("--days", type=int, default=CERT_DAYS,
                       help=f"validity (default: {CERT_DAYS}, never beyond the CA's)")
    issue.add_argument("--force", action="store_true", help="replace existing files")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except _Usage as exc:
        print(exc, file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    name = "ocpp-edge " + " ".join(filter(None, [args.command,
                                                getattr(args, "cert_command", None)]))
    try:
        if args.command == "passwd":
            return _passwd(args)
        if args.cert_command == "init":
            return _cert_init(args)
        return _cert_issue(args)
    except (OcppEdgeError, _Failure) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{name}: {where}{exc.strerror or exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 1


class _Failure(Exception):
    """A one-line reason for exit code 1."""


# --- passwd ---------------------------------------------------------------------------

def _password_file(args) -> str:
    if args.file:
        return args.file
    import configobj  # only to read this one key, even from an otherwise broken file

    path = args.config or DEFAULT_CONFIG
    if args.config is None and not os.path.exists(path):
        return DEFAULT_PASSWORD_FILE
    try:
        conf = configobj.ConfigObj(path, interpolation=False, file_error=True)
    except OSError as exc:
        raise _Failure(f"cannot read the configuration {path}: {exc.strerror or exc}"
                       ) from None
    except configobj.ConfigObjError as exc:
        raise _Failure(f"cannot read the configuration {path}: {exc}") from None
    value = conf.get(PASSWORD_FILE_KEY, DEFAULT_PASSWORD_FILE)
    if not isinstance(value, str) or not value.strip():
        raise _Failure(f"{PASSWORD_FILE_KEY} in {path} names no file; give --file")
    return value.strip()


def _read_key(args) -> bytes:
    if sys.stdin.isatty():
        first = getpass.getpass(f"Key for {args.cid}: ")
        if getpass.getpass("Again: ") != first:
            raise _Failure("the two keys differ; nothing changed")
        key = first.encode("utf-8")
    else:
        key = sys.stdin.buffer.read()
        if key.endswith(b"\n"):
            key = key[:-1]
            if key.endswith(b"\r"):
                key = key[:-1]
    if not key:
        raise _Failure("no key given; nothing changed")
    return key


def _generate() -> bytes:
    """A random key as the text of its hexadecimal digits (see PASSWD_HELP).

    The raw bytes always include one outside ASCII: that is how the gateway tells a
    charge point sending the decoded bytes from one sending text, so the raw form of
    every generated key must be recognisable (all-ASCII odds: 1 in a million).
    """
    while True:
        raw = secrets.token_bytes(GENERATED_BYTES)
        if not raw.isascii():
            return raw.hex().encode("ascii")


def _passwd(args) -> int:
    from ocpp_edge.south import credentials

    cid = args.cid
    problem = credentials.cid_problem(cid)
    if problem:
        raise _Failure(problem.replace(" (last path segment)", ""))
    path = _password_file(args)
    if args.delete:
        if not credentials.remove_entry(path, cid):
            raise _Failure(f"{path}: no entry for {cid!r}")
        print(f"removed {cid!r} from {path}", file=sys.stderr)
        return 0
    if args.generate:
        key = _generate()
    else:
        key = _read_key(args)
        if len(key) < 16:
            print(f"warning: the key is {len(key)} bytes; OCPP asks for at least 16",
                  file=sys.stderr)
    replaced = credentials.set_entry(path, cid, key)
    if args.generate:
        print(key.decode("ascii"))
    print(f"changed the key of {cid!r} in {path}" if replaced else
          f"added {cid!r} to {path}", file=sys.stderr)
    return 0


# --- cert -----------------------------------------------------------------------------

def _cert_init(args) -> int:
    from ocpp_edge.tools import cert as certtool

    files = certtool.init(args.dir, args.host, args.ip, "rsa" if args.rsa else "ec",
                          args.days, force=args.force, keep_ca=args.keep_ca)
    server = certtool.load_certificates(files.server_cert)[0]
    names = server.extensions.get_extension_for_class(
        certtool.x509.SubjectAlternativeName).value
    shown = [str(v) for v in names.get_values_for_type(certtool.x509.DNSName)] + \
        [str(v) for v in names.get_values_for_type(certtool.x509.IPAddress)]
    for path in files if not args.keep_ca else files[2:]:
        print(path)
    print(f"server certificate for {', '.join(shown)}; valid until "
          f"{certtool.not_valid_after(server):%Y-%m-%d}", file=sys.stderr)
    return 0


def _cert_issue(args) -> int:
    from ocpp_edge.tools import cert as certtool

    files = certtool.issue(args.dir, args.cid, args.out_dir, "rsa" if args.rsa else "ec",
                           args.days, force=args.force)
    cert = certtool.load_certificates(files.cert)[0]
    for path in files:
        print(path)
    print(f"certificate of {args.cid!r} valid until "
          f"{certtool.not_valid_after(cert):%Y-%m-%d}", file=sys.stderr)
    return 0
