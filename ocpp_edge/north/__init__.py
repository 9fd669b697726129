"""The backend side: the MQTT link to the broker.

``uplink`` (paho-mqtt driven from the event loop, publishing from the disk buffer and
removing a message only on the broker's acknowledgement; the downstream subscription),
``presence`` (the retained gateway status and the charge point lifecycle events).

May import: paho-mqtt, tornado's IOLoop, the standard library, ``ocpp_edge.config``,
``ocpp_edge.core``, ``ocpp_edge.store`` and ``ocpp_edge.errors``. Never imports
``south`` (tests/test_layout.py).
"""
