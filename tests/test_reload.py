"""SIGHUP (``systemctl reload``): the file is read again and applied without dropping charge
points; a file that is invalid or cannot be applied leaves the running configuration.

Real parts throughout: the gateway process, Mosquitto, WebSocket clients, TLS handshakes
with certificates made by ``ocpp-edge cert``, and the password file by ``ocpp-edge passwd``.
"""

from __future__ import annotations

import base64
import json
import signal
import ssl
import subprocess
import sys

import pytest
from conftest import ROOT, Backend, free_port
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect


def heartbeat(uid: str) -> str:
    return json.dumps([2, uid, "Heartbeat", {}])


def set_keys(gw, **keys: str) -> None:
    """Rewrite the gateway's config file with ``keys`` replaced or added (dots as __)."""
    wanted = {k.replace("__", "."): v for k, v in keys.items()}
    lines = []
    for line in gw.config.read_text().splitlines():
        key = line.partition("=")[0].strip()
        if key in wanted:
            continue
        lines.append(line)
    lines += [f"{k} = {v}" for k, v in wanted.items()]
    gw.config.write_text("\n".join(lines) + "\n")


def reload(gw, expect: str) -> None:
    mark = len(gw.log_text())
    gw.proc.send_signal(signal.SIGHUP)
    deadline_text = gw.wait_log(expect)
    assert expect in deadline_text[mark:], deadline_text[mark:]


def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ocpp_edge", *args], input=stdin,
                          capture_output=True, cwd=ROOT, timeout=60, check=True)


def test_topics_and_log_level_change_live_and_the_charge_point_stays(broker, make_gateway):
    backend = Backend(broker.port, subscribe="#")
    gw = make_gateway(broker.port)
    gw.wait_log("subscribed to ocpp/cs/+")
    with ws_connect(f"{gw.url}/CP1", subprotocols=["ocpp1.6"], open_timeout=5) as ws:
        ws.send(heartbeat("before"))
        assert backend.expect("ocpp/cp/CP1")[1]["UniqueId"] == "before"

        set_keys(gw, ocpp__upstream__topic="site/${cid}/up",
                 ocpp__dnstream__topic="site/${cid}/down", log__level="info")
        reload(gw, "reloaded ")
        gw.wait_log("subscribed to ocpp/site/+/down")

        # The same socket, the new upstream topic.
        ws.send(heartbeat("after"))
        assert backend.expect("ocpp/site/CP1/up")[1]["UniqueId"] == "after"
        # Commands arrive on the new downstream topic; the old one is no longer heard.
        backend.publish("ocpp/cs/CP1", {"MessageTypeId": 2, "UniqueId": "old-topic",
                                        "Action": "Reset", "Payload": {"type": "Soft"}})
        backend.publish("ocpp/site/CP1/down", {"MessageTypeId": 2, "UniqueId": "new-topic",
                                               "Action": "Reset", "Payload": {"type": "Soft"}})
        frame = json.loads(ws.recv(timeout=10))
        assert frame[:3] == [2, "new-topic", "Reset"]
        # log.level = info now: debug lines stop
        mark = len(gw.log_text())
        ws.send(json.dumps([3, "new-topic", {"status": "Accepted"}]))
        assert backend.expect("ocpp/cp/CP1/Reply")[1]["UniqueId"] == "new-topic"
        ws.send(heartbeat("quiet"))
        backend.expect("ocpp/site/CP1/up")
        assert " DEBUG " not in gw.log_text()[mark:]
    backend.close()


def test_an_invalid_file_keeps_the_running_configuration(broker, make_gateway):
    backend = Backend(broker.port)
    gw = make_gateway(broker.port)
    gw.wait_log("subscribed to ocpp/cs/+")
    with ws_connect(f"{gw.url}/CP2", subprotocols=["ocpp1.6"], open_timeout=5) as ws:
        set_keys(gw, ocpp__upstream__topic="changed/${cid}", mqtt__keepalve="30s")
        reload(gw, "reload of")
        text = gw.log_text()
        assert "mqtt.keepalve" in text and "old configuration stays in use" in text
        ws.send(heartbeat("still-old"))
        assert backend.expect("ocpp/cp/CP2")[1]["UniqueId"] == "still-old"
        # An unknown placeholder is refused the same way: no literal junk in topics.
        set_keys(gw, ocpp__upstream__topic="x/${nope}")
        gw.config.write_text(gw.config.read_text().replace("mqtt.keepalve = 30s\n", ""))
        reload(gw, "${nope}")
        ws.send(heartbeat("still-old-2"))
        assert backend.expect("ocpp/cp/CP2")[1]["UniqueId"] == "still-old-2"
    assert gw.proc.poll() is None
    backend.close()


def test_restart_only_changes_are_named_and_not_half_applied(broker, make_gateway):
    gw = make_gateway(broker.port)
    gw.wait_log("subscribed to ocpp/cs/+")
    set_keys(gw, mqtt__client_id="another-id", buffer__max_messages="500")
    reload(gw, "changes to mqtt.*, buffer.* take effect after a restart")
    # The running connection to the broker is kept as it was: no reconnect, same id.
    assert gw.log_text().count("MQTT connected") == 1


def basic(cid: str, key: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(cid.encode() + b":" + key).decode()}


def test_passwords_reload_without_dropping_anyone(broker, make_gateway, tmp_path):
    backend = Backend(broker.port)
    passwords = tmp_path / "passwords"
    cli("passwd", "CP-A", "--file", str(passwords), stdin=b"key of charger A\n")
    gw = make_gateway(broker.port, f"auth.allow_anonymous = false\n"
                                   f"auth.password_file = {passwords}\n")
    with ws_connect(f"{gw.url}/CP-A", subprotocols=["ocpp1.6"], open_timeout=5,
                    additional_headers=basic("CP-A", b"key of charger A")) as a:
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(f"{gw.url}/CP-B", subprotocols=["ocpp1.6"], open_timeout=5,
                       additional_headers=basic("CP-B", b"key of charger B"))
        assert refused.value.response.status_code == 401

        cli("passwd", "CP-B", "--file", str(passwords), stdin=b"key of charger B\n")
        cli("passwd", "CP-A", "--file", str(passwords), "--delete")
        reload(gw, "reloaded ")

        with ws_connect(f"{gw.url}/CP-B", subprotocols=["ocpp1.6"], open_timeout=5,
                        additional_headers=basic("CP-B", b"key of charger B")) as b:
            b.send(heartbeat("b"))
            assert backend.expect("ocpp/cp/CP-B")[1]["UniqueId"] == "b"
        # A, connected before, stays; a new login with its removed key is refused.
        a.send(heartbeat("a"))
        assert backend.expect("ocpp/cp/CP-A")[1]["UniqueId"] == "a"
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(f"{gw.url}/CP-A", subprotocols=["ocpp1.6"], open_timeout=5,
                       additional_headers=basic("CP-A", b"key of charger A"))
        assert refused.value.response.status_code == 401
        assert "CP-A: disconnected" not in gw.log_text()
    backend.close()


def tls_client(ca: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False  # the certificate names the host; the test dials 127.0.0.1
    return ctx


def test_certificates_reload_for_new_handshakes(broker, make_gateway, tmp_path):
    backend = Backend(broker.port)
    first, second = tmp_path / "tls1", tmp_path / "tls2"
    live = tmp_path / "live"
    live.mkdir()
    cli("cert", "init", "--dir", str(first), "--host", "gw.test")
    cli("cert", "init", "--dir", str(second), "--host", "gw.test")
    for name in ("server.pem", "server.key"):
        (live / name).write_bytes((first / name).read_bytes())
    port = free_port()
    gw = make_gateway(broker.port, f"ocpp.listener.wss = 127.0.0.1:{port}\n"
                                   f"ocpp.listener.wss.certfile = {live / 'server.pem'}\n"
                                   f"ocpp.listener.wss.keyfile = {live / 'server.key'}\n"
                                   f"ocpp.listener.wss.cacertfile = {first / 'ca.pem'}\n"
                                   "ocpp.listener.wss.allow_anonymous = true\n")
    url = f"wss://127.0.0.1:{port}/ocpp"
    with ws_connect(f"{url}/OLD", subprotocols=["ocpp1.6"], open_timeout=5,
                    ssl=tls_client(str(first / "ca.pem"))) as old:
        # A renewed server certificate from another CA, then `systemctl reload`.
        for name in ("server.pem", "server.key"):
            (live / name).write_bytes((second / name).read_bytes())
        reload(gw, "reloaded ")
        with ws_connect(f"{url}/NEW", subprotocols=["ocpp1.6"], open_timeout=5,
                        ssl=tls_client(str(second / "ca.pem"))) as new:
            new.send(heartbeat("n"))
            assert backend.expect("ocpp/cp/NEW")[1]["UniqueId"] == "n"
        with pytest.raises(ssl.SSLCertVerificationError):
            ws_connect(f"{url}/OLD2", subprotocols=["ocpp1.6"], open_timeout=5,
                       ssl=tls_client(str(first / "ca.pem")))
        old.send(heartbeat("o"))  # the connection made before the reload is still served
        assert backend.expect("ocpp/cp/OLD")[1]["UniqueId"] == "o"
        assert "OLD: disconnected" not in gw.log_text()

    # A key that does not match its certificate: the reload fails, the old one stays.
    (live / "server.key").write_bytes((first / "server.key").read_bytes())
    reload(gw, "reload of")
    with ws_connect(f"{url}/NEW2", subprotocols=["ocpp1.6"], open_timeout=5,
                    ssl=tls_client(str(second / "ca.pem"))) as again:
        again.send(heartbeat("n2"))
        assert backend.expect("ocpp/cp/NEW2")[1]["UniqueId"] == "n2"
    backend.close()
