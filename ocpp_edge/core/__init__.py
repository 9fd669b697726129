"""The OCPP-J protocol core, sans-I/O: text and values in, events and text out.

``ocppj/`` (messages, codec, wire error codes), ``session`` (the state machine of one
charge point connection: call discipline, deadlines, liveness), ``router`` (messages ⇄
MQTT topics and EMQX-format payloads), ``validation`` (the OCA JSON schemas), ``local``
(the answers given while the backend is away). Time is passed in; nothing here reads a
clock, opens a socket or touches a database, so all of it is tested and fuzzed with
strings and numbers.

May import: the standard library (no I/O modules), fastjsonschema, and
``ocpp_edge.errors``. Imports no other part of ocpp_edge (tests/test_layout.py).
"""
