"""Schema checking (ocpp_edge/core/validation.py) against the shipped OCA schemas."""

from __future__ import annotations

from ocpp_edge.core.ocppj.errors import (
    FormatViolation,
    NotImplementedError_,
    OccurrenceConstraintViolation,
    PropertyConstraintViolation,
    TypeConstraintViolation,
)
from ocpp_edge.core.validation import Validator

VERSIONS = ["ocpp1.6", "ocpp2.0.1", "ocpp2.1"]


def compiled_versions(v: Validator) -> set[str]:
    return {version for version, _ in v._compiled}


def test_nothing_is_compiled_until_used_or_warmed_up():
    v = Validator(None, VERSIONS)
    assert len(v) > 300 and not v._compiled
    assert v.warm_up_step() is False  # no version asked for yet
    assert v.check("ocpp1.6", "Heartbeat", {}, False) is None
    assert set(v._compiled) == {("ocpp1.6", "HeartbeatRequest")}


def test_warm_up_compiles_one_version_one_schema_per_step():
    v = Validator(None, VERSIONS)
    assert v.warm_up("ocpp1.6") is True
    assert v.warm_up("ocpp1.6") is False  # queued once
    steps = 0
    while v.warm_up_step():
        steps += 1
        assert len(v._compiled) == steps
    assert compiled_versions(v) == {"ocpp1.6"}
    assert steps == sum(1 for version, _ in v._schemas if version == "ocpp1.6")
    assert v.warm_up("ocpp2.0.1") is True
    while v.warm_up_step():
        pass
    assert compiled_versions(v) == {"ocpp1.6", "ocpp2.0.1"}
    assert v.warm_up("ocpp9") is False  # a version without schemas: nothing to do


def test_errors_map_onto_ocpp_error_codes():
    v = Validator(None, VERSIONS)
    good = {"connectorId": 1, "errorCode": "NoError", "status": "Available"}
    assert v.check("ocpp1.6", "StatusNotification", good, False) is None
    missing = {k: good[k] for k in ("connectorId", "errorCode")}
    assert isinstance(v.check("ocpp1.6", "StatusNotification", missing, False),
                      OccurrenceConstraintViolation)
    assert isinstance(v.check("ocpp1.6", "StatusNotification", {**good, "connectorId": "1"},
                              False), TypeConstraintViolation)
    assert isinstance(v.check("ocpp1.6", "StatusNotification", {**good, "status": "Sleepy"},
                              False), PropertyConstraintViolation)
    assert isinstance(v.check("ocpp1.6", "StatusNotification", {**good, "extra": 1}, False),
                      FormatViolation)
    assert isinstance(v.check("ocpp1.6", "NoSuchAction", {}, False), NotImplementedError_)
    assert v.check("ocpp1.6", "NoSuchAction", {}, True) is None  # a vendor action's reply
