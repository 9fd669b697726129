"""The configuration: read and check ocpp-edge.conf, hand out typed, frozen settings.

``keys`` (the spec ``configspec.ini``, the check functions it names, the key families
outside it), ``parse`` (reading the file with configobj, line numbers, unknown keys, the
error message), ``checks`` (checks between keys: TLS and password files, the admin token,
the presence topics, ...), ``settings`` (the dataclasses every other part reads), ``tls``
(the TLS contexts, built here first so that a bad certificate is reported against its
key). Every problem in the file is reported at once, as one ``ConfigError``.

May import: the standard library, configobj, ``ocpp_edge.errors`` and the pure
``ocpp_edge.core`` (the topic placeholders); below every part that reads settings, so it
imports none of them (tests/test_layout.py). Besides ``ocpp-edge ctl`` and ``ocpp-edge
passwd``, which read a key or two even from a broken file, the only importer of configobj.
"""

from ocpp_edge.config.checks import MIN_TOKEN_LENGTH, is_loopback, load_token
from ocpp_edge.config.keys import SUBPROTOCOLS, parse_duration, parse_size
from ocpp_edge.config.parse import defaults, load, load_text
from ocpp_edge.config.settings import (
    AdminSettings,
    AuthSettings,
    BufferSettings,
    Listen,
    ListenerSettings,
    LogSettings,
    MqttSettings,
    OcppSettings,
    OfflineSettings,
    Settings,
)

__all__ = [
    "MIN_TOKEN_LENGTH", "SUBPROTOCOLS", "AdminSettings", "AuthSettings", "BufferSettings",
    "Listen", "ListenerSettings", "LogSettings", "MqttSettings", "OcppSettings",
    "OfflineSettings", "Settings",
    "defaults", "is_loopback", "load", "load_text", "load_token", "parse_duration",
    "parse_size",
]
