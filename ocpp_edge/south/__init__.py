"""The charge point side: the OCPP-J WebSocket listener and what guards it.

``listener`` (Tornado HTTP/WebSocket server, handshake rules, one handler per charge
point), ``frames`` (the batch WebSocket frame reader), ``auth`` (security profiles 1-3,
the failure limiter), ``credentials`` (the password file). The gateway hands each
handler's text to the core and the core's text back.

May import: tornado, the standard library, ``ocpp_edge.config``, ``ocpp_edge.core`` and
``ocpp_edge.errors``. Never imports ``north``: a broker outage reaches the charge points
only through the buffer (tests/test_layout.py).
"""
