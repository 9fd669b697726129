"""The composition root: the one part that knows every other part.

``root`` (the :class:`Gateway`: builds the parts from the settings, carries the core's
effects out through the south and north adapters, the buffer's group commit, reload),
``local`` (offline operation wired in: ``ocpp.upstream_down_policy = local``),
``opsview`` (the narrow view of the gateway that operations read).

May import every part but ``daemon`` and ``tools``; only ``daemon`` imports it
(tests/test_layout.py).
"""

from ocpp_edge.gateway.root import Gateway

__all__ = ["Gateway"]
