"""The site operator's command line tools: ``ocpp-edge passwd`` and ``ocpp-edge cert``.

``commands`` (argument parsing for both), ``cert`` (a site CA, server and charge point
certificates with cryptography).

May import: the standard library, cryptography, ``ocpp_edge.south`` (the password file
format) and ``ocpp_edge.errors`` (tests/test_layout.py).
"""
