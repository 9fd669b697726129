#!/usr/bin/python3
"""A central system for packaging/deb-test, on Debian's python3-paho-mqtt (installed
with ocpp-edge anyway): answers BootNotification and Heartbeat CALLs arriving on
ocpp/cp/<id> with a CALLRESULT on ocpp/cs/<id>, and writes every message it receives
as one JSON line to the file given as argument.
"""

import json
import sys
import time
from datetime import datetime, timezone

import paho.mqtt.client as mqtt

LOG = open(sys.argv[1] if len(sys.argv) > 1 else "/srv/backend.log", "a", buffering=1)


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def on_connect(client, userdata, flags, rc, properties=None):
    client.subscribe("ocpp/cp/#", qos=1)
    print("backend: connected, subscribing to ocpp/cp/#", flush=True)


def on_subscribe(client, userdata, mid, *args):  # paho 1.6 and 2.x signatures
    print("backend: subscribed to ocpp/cp/#", flush=True)  # deb-test waits for this line


def on_message(client, userdata, msg):
    try:
        body = json.loads(msg.payload)
    except ValueError:
        body = {"unparsable": msg.payload.decode("utf-8", "replace")}
    LOG.write(json.dumps({"topic": msg.topic, "payload": body}) + "\n")
    parts = msg.topic.split("/")
    if len(parts) != 3 or body.get("MessageTypeId") != 2:
        return
    answers = {
        "BootNotification": {"currentTime": now(), "interval": 300, "status": "Accepted"},
        "Heartbeat": {"currentTime": now()},
    }
    payload = answers.get(body.get("Action"))
    if payload is not None:
        client.publish(f"ocpp/cs/{parts[2]}", json.dumps(
            {"MessageTypeId": 3, "UniqueId": body["UniqueId"], "Payload": payload}), qos=1)


if hasattr(mqtt, "CallbackAPIVersion"):  # paho 2.x
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="deb-test-backend")
else:  # paho 1.6 (Debian bookworm)
    client = mqtt.Client(client_id="deb-test-backend")
client.on_connect = on_connect
client.on_message = on_message
client.on_subscribe = on_subscribe
while True:
    try:
        client.connect("127.0.0.1", 1883, keepalive=30)
        break
    except OSError as exc:
        print(f"backend: broker not there yet ({exc})", flush=True)
        time.sleep(0.5)
client.loop_forever()
