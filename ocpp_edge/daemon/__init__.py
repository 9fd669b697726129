"""The program: command line, service life cycle, systemd and the journal.

``cli`` (argv → settings → logging → gateway → event loop; failures → exit codes),
``service`` (start, SIGHUP reload, SIGTERM stop, the watchdog), ``notify`` (sd_notify),
``log`` (journald-friendly logging).

The only part that imports ``ocpp_edge.gateway``; may import every other part but
``north``, ``south`` and ``store`` directly (tests/test_layout.py).
"""
