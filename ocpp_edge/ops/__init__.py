"""Operating a running gateway: the admin endpoint, metrics, ``ocpp-edge ctl``.

``operations`` (the hooks the gateway calls as things happen; it reads a narrow view
of the gateway and acts through named commands), ``view`` (that view), ``admin`` (the
local HTTP endpoint), ``metrics`` (the Prometheus registry), ``ctl`` (the command line
client, run in its own process).

May import: tornado, the standard library, ``ocpp_edge.config``, ``ocpp_edge.core``,
``ocpp_edge.north`` (presence, the status topic) and ``ocpp_edge.errors``. Never imports
``ocpp_edge.gateway`` (tests/test_layout.py).
"""
