"""What ocpp-edge keeps on disk.

``record`` (the buffer's interface: records, overflow policies), ``diskbuffer`` (the
durable upstream FIFO in SQLite: crash-safe, bounded, group-committed), ``localstate``
(what offline operation remembers: the authorization cache, accepted boot intervals,
local transaction ids and their mapping to the backend's). No network.

May import: the standard library (sqlite3), ``ocpp_edge.core`` and ``ocpp_edge.errors``
(tests/test_layout.py).
"""
