"""Local answers while the backend is away (ocpp_edge/core/local.py, issue 15).

Every charge-point-initiated action of 1.6, 2.0.1 and 2.1 is answered either with a payload
the shipped schemas accept as its response or with a CALLERROR, and which one each gets is
pinned here. Plus the authorization cache rules, boot, local transaction ids, what backend
answers teach, disagreements, transaction id rewriting, and never raising on any input.
"""

from __future__ import annotations

import ast
import calendar
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ocpp_edge.core import local
from ocpp_edge.core.local import (
    ANSWERS,
    Authorization,
    LocalAnswer,
    LocalOptions,
    disagreement,
    downstream_transaction_id,
    format_time,
    id_key,
    learned_authorization,
    learned_boot_interval,
    local_answer,
    parse_time,
    response_transaction_id,
    upstream_transaction_id,
    with_transaction_id,
)
from ocpp_edge.core.ocppj.errors import InternalError
from ocpp_edge.core.validation import Validator, default_schema_dir

V16, V201, V21 = "ocpp1.6", "ocpp2.0.1", "ocpp2.1"
VERSIONS = [V16, V201, V21]
SCHEMAS = default_schema_dir()
VALIDATOR = Validator(None, VERSIONS, "")
NOW = float(calendar.timegm((2026, 12, 4, 5, 21, 3)))
T = "2026-12-04T05:00:00Z"
REJECT, ACCEPT = LocalOptions(), LocalOptions(unknown_id="accept", data_transfer="accept")


class FakeKnowledge:
    """The store, as plain dicts; records what it was asked."""

    def __init__(self, auths=None, boots=None, first_tx=1000):
        self.auths = dict(auths or {})
        self.boots = dict(boots or {})
        self.next_tx = first_tx
        self.asked: list[str] = []
        self.issued: list[tuple[str, int]] = []

    def authorization(self, id_key):
        self.asked.append(id_key)
        return self.auths.get(id_key)

    def boot_interval(self, cid):
        return self.boots.get(cid)

    def new_transaction_id(self, cid):
        self.next_tx += 1
        self.issued.append((cid, self.next_tx))
        return self.next_tx


def answer(version, action, payload, knowledge=None, options=REJECT, now=NOW, cid="CP1"):
    return local_answer(version, action, payload, cid, knowledge or FakeKnowledge(), now,
                        options)


# -- directions: every action in the schema files is classified --------------------------

CP_16 = {"Authorize", "BootNotification", "DataTransfer", "DiagnosticsStatusNotification",
         "FirmwareStatusNotification", "Heartbeat", "MeterValues", "StartTransaction",
         "StatusNotification", "StopTransaction",
         # security extension (Improved security for OCPP 1.6-J)
         "LogStatusNotification", "SecurityEventNotification", "SignCertificate",
         "SignedFirmwareStatusNotification"}
CSMS_16 = {"CancelReservation", "CertificateSigned", "ChangeAvailability",
           "ChangeConfiguration", "ClearCache", "ClearChargingProfile", "DataTransfer",
           "DeleteCertificate", "ExtendedTriggerMessage", "GetCompositeSchedule",
           "GetConfiguration", "GetDiagnostics", "GetInstalledCertificateIds",
           "GetLocalListVersion", "GetLog", "InstallCertificate", "RemoteStartTransaction",
           "RemoteStopTransaction", "ReserveNow", "Reset", "SendLocalList",
           "SetChargingProfile", "SignedUpdateFirmware", "TriggerMessage", "UnlockConnector",
           "UpdateFirmware"}
CP_201 = {"Authorize", "BootNotification", "ClearedChargingLimit", "DataTransfer",
          "FirmwareStatusNotification", "Get15118EVCertificate", "GetCertificateStatus",
          "Heartbeat", "LogStatusNotification", "MeterValues", "NotifyChargingLimit",
          "NotifyCustomerInformation", "NotifyDisplayMessages", "NotifyEVChargingNeeds",
          "NotifyEVChargingSchedule", "NotifyEvent", "NotifyMonitoringReport", "NotifyReport",
          "PublishFirmwareStatusNotification", "ReportChargingProfiles",
          "ReservationStatusUpdate", "SecurityEventNotification", "SignCertificate",
          "StatusNotification", "TransactionEvent"}
CSMS_201 = {"CancelReservation", "CertificateSigned", "ChangeAvailability", "ClearCache",
            "ClearChargingProfile", "ClearDisplayMessage", "ClearVariableMonitoring",
            "CostUpdated", "CustomerInformation", "DataTransfer", "DeleteCertificate",
            "GetBaseReport", "GetChargingProfiles", "GetCompositeSchedule",
            "GetDisplayMessages", "GetInstalledCertificateIds", "GetLocalListVersion",
            "GetLog", "GetMonitoringReport", "GetReport", "GetTransactionStatus",
            "GetVariables", "InstallCertificate", "PublishFirmware",
            "RequestStartTransaction", "RequestStopTransaction", "ReserveNow", "Reset",
            "SendLocalList", "SetChargingProfile", "SetDisplayMessage", "SetMonitoringBase",
            "SetMonitoringLevel", "SetNetworkProfile", "SetVariableMonitoring",
            "SetVariables", "TriggerMessage", "UnlockConnector", "UnpublishFirmware",
            "UpdateFirmware"}
CP_21 = CP_201 | {"BatterySwap", "ClosePeriodicEventStream", "GetCertificateChainStatus",
                  "NotifyDERAlarm", "NotifyDERStartStop", "NotifyPeriodicEventStream",
                  "NotifyPriorityCharging", "NotifySettlement", "OpenPeriodicEventStream",
                  "PullDynamicScheduleUpdate", "ReportDERControl", "VatNumberValidation"}
CSMS_21 = CSMS_201 | {"AFRRSignal", "AdjustPeriodicEventStream", "ChangeTransactionTariff",
                      "ClearDERControl", "ClearTariffs", "GetDERControl",
                      "GetPeriodicEventStream", "GetTariffs", "NotifyAllowedEnergyTransfer",
                      "NotifyWebPaymentStarted", "RequestBatterySwap", "SetDERControl",
                      "SetDefaultTariff", "UpdateDynamicSchedule", "UsePriorityCharging"}
CP = {V16: CP_16, V201: CP_201, V21: CP_21}
CSMS = {V16: CSMS_16, V201: CSMS_201, V21: CSMS_21}


def schema_actions(version: str) -> set[str]:
    names = set()
    for path in (SCHEMAS / version).glob("*.json"):
        stem = path.stem
        for suffix in ("Request", "Response"):
            stem = stem.removesuffix(suffix)
        names.add(stem)
    return names


@pytest.mark.parametrize("version", VERSIONS)
def test_every_schema_action_has_a_direction_and_every_cp_action_an_answer(version):
    assert CP[version] | CSMS[version] == schema_actions(version)
    assert CP[version] & CSMS[version] == {"DataTransfer"}
    assert set(ANSWERS[version]) == CP[version]
    assert all(isinstance(text, str) and text for text in ANSWERS[version].values())


# -- every CP→CSMS action: a schema-valid answer or a CALLERROR, pinned --------------------

def minimal(schema: dict, node: dict):
    """A request holding only the required fields (first enum value, 1, "x", ...)."""
    if "$ref" in node:
        node = schema["definitions"][node["$ref"].split("/")[-1]]
    if "enum" in node:
        return node["enum"][0]
    kind = node.get("type")
    if kind == "object":
        return {k: minimal(schema, node["properties"][k]) for k in node.get("required", [])}
    if kind == "array":
        return [minimal(schema, node["items"])] * max(1, node.get("minItems", 1))
    if kind == "string":
        return T if node.get("format") == "date-time" else "x"
    if kind in ("integer", "number"):
        return node.get("minimum", 1)
    assert kind == "boolean", node
    return True


REQUESTS_16 = {
    "Authorize": {"idTag": "TAG1"},
    "BootNotification": {"chargePointVendor": "V", "chargePointModel": "M"},
    "DataTransfer": {"vendorId": "acme"},
    "DiagnosticsStatusNotification": {"status": "Idle"},
    "FirmwareStatusNotification": {"status": "Idle"},
    "Heartbeat": {},
    "MeterValues": {"connectorId": 1, "transactionId": 5,
                    "meterValue": [{"timestamp": T, "sampledValue": [{"value": "1"}]}]},
    "StartTransaction": {"connectorId": 1, "idTag": "TAG1", "meterStart": 0, "timestamp": T},
    "StatusNotification": {"connectorId": 1, "errorCode": "NoError", "status": "Available"},
    "StopTransaction": {"transactionId": 5, "meterStop": 10, "timestamp": T, "idTag": "TAG1"},
    "LogStatusNotification": {"status": "Idle"},
    "SecurityEventNotification": {"type": "StartupOfTheDevice", "timestamp": T},
    "SignCertificate": {"csr": "x"},
    "SignedFirmwareStatusNotification": {"status": "Idle"},
}


def request_for(version: str, action: str) -> dict:
    if version == V16:
        return REQUESTS_16[action]
    path = SCHEMAS / version / f"{action}Request.json"
    if not path.exists():  # 2.1 SEND-only: one schema without suffix
        path = SCHEMAS / version / f"{action}.json"
    schema = json.loads(path.read_text(encoding="utf-8-sig"))
    return minimal(schema, schema)


ERROR = "CALLERROR"
# exact payloads, the keys of a payload built from time/knowledge, or a CALLERROR
EXPECTED_16 = {
    "Authorize": {"idTagInfo"}, "BootNotification": {"currentTime", "interval", "status"},
    "DataTransfer": {"status": "Rejected"}, "DiagnosticsStatusNotification": {},
    "FirmwareStatusNotification": {}, "Heartbeat": {"currentTime"}, "MeterValues": {},
    "StartTransaction": {"idTagInfo", "transactionId"}, "StatusNotification": {},
    "StopTransaction": {"idTagInfo"}, "LogStatusNotification": {},
    "SecurityEventNotification": {}, "SignCertificate": {"status": "Rejected"},
    "SignedFirmwareStatusNotification": {},
}
EXPECTED_201 = {
    "Authorize": {"idTokenInfo"}, "BootNotification": {"currentTime", "interval", "status"},
    "ClearedChargingLimit": {}, "DataTransfer": {"status": "Rejected"},
    "FirmwareStatusNotification": {},
    "Get15118EVCertificate": {"status": "Failed", "exiResponse": ""},
    "GetCertificateStatus": {"status": "Failed"}, "Heartbeat": {"currentTime"},
    "LogStatusNotification": {}, "MeterValues": {}, "NotifyChargingLimit": {},
    "NotifyCustomerInformation": {}, "NotifyDisplayMessages": {},
    "NotifyEVChargingNeeds": {"status": "Rejected"},
    "NotifyEVChargingSchedule": {"status": "Rejected"}, "NotifyEvent": {},
    "NotifyMonitoringReport": {}, "NotifyReport": {}, "PublishFirmwareStatusNotification": {},
    "ReportChargingProfiles": {}, "ReservationStatusUpdate": {},
    "SecurityEventNotification": {}, "SignCertificate": {"status": "Rejected"},
    "StatusNotification": {}, "TransactionEvent": {},  # the minimal request has no idToken
}
EXPECTED_21 = {
    **EXPECTED_201, "BatterySwap": {}, "ClosePeriodicEventStream": {},
    "GetCertificateChainStatus": {"certificateStatus"}, "NotifyDERAlarm": {},
    "NotifyDERStartStop": {}, "NotifyPeriodicEventStream": ERROR, "NotifyPriorityCharging": {},
    "NotifySettlement": {}, "OpenPeriodicEventStream": {"status": "Rejected"},
    "PullDynamicScheduleUpdate": {"status": "Rejected"}, "ReportDERControl": {},
    "VatNumberValidation": ERROR,
}
EXPECTED = {V16: EXPECTED_16, V201: EXPECTED_201, V21: EXPECTED_21}
CASES = [(v, a) for v in VERSIONS for a in sorted(CP[v])]


def rich_knowledge() -> FakeKnowledge:
    later = NOW + 86400
    return FakeKnowledge(
        auths={"TAG1": Authorization("Accepted", later, "PARENT"),
               "Central:x": Authorization("Accepted", later, "GROUP", "Local")},
        boots={"CP1": 300})


@pytest.mark.parametrize("knowledge", [FakeKnowledge, rich_knowledge], ids=["empty", "rich"])
@pytest.mark.parametrize("version,action", CASES)
def test_each_cp_action_gets_a_valid_answer_or_a_callerror(version, action, knowledge):
    request = request_for(version, action)
    if action != "NotifyPeriodicEventStream":
        assert VALIDATOR.check(version, action, request, False) is None  # a valid example
    result = answer(version, action, request, knowledge())
    expected = EXPECTED[version][action]
    if expected == ERROR:
        assert result.payload is None and isinstance(result.error, InternalError)
        assert result.error.code_for(version) == "InternalError"
        assert "unreachable" in result.error.description
        return
    assert result.error is None, result.error
    assert VALIDATOR.check(version, action, result.payload, True) is None, result.payload
    if isinstance(expected, dict):
        assert result.payload == expected
    else:
        assert set(result.payload) == expected


def test_the_table_covers_the_pinned_expectations():
    for version in VERSIONS:
        assert set(EXPECTED[version]) == CP[version]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("action", ["Reset", "RemoteStartTransaction", "RequestStartTransaction",
                                    "VendorThing", "", "heartbeat"])
def test_other_directions_and_unknown_actions_get_internal_error(version, action):
    result = answer(version, action, {})
    assert result.payload is None
    assert result.error.code_for(version) == "InternalError"
    assert "central system is unreachable" in result.error.description
    assert not result.error.description.startswith("local answer failed")


def test_an_unknown_version_gets_internal_error():
    assert answer("ocpp9", "Heartbeat", {}).error.code_for(V16) == "InternalError"


# -- boot and heartbeat --------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_boot_accepted_with_the_remembered_interval(version):
    result = answer(version, "BootNotification", {}, FakeKnowledge(boots={"CP1": 300}))
    assert result.payload == {"currentTime": "2026-12-04T05:21:03Z", "interval": 300,
                              "status": "Accepted"}


@pytest.mark.parametrize("version", VERSIONS)
def test_boot_pending_when_never_accepted(version):
    knowledge = FakeKnowledge(boots={"OTHER": 300})
    assert answer(version, "BootNotification", {}, knowledge).payload == {
        "currentTime": "2026-12-04T05:21:03Z", "interval": 60, "status": "Pending"}
    result = answer(version, "BootNotification", {}, knowledge,
                    LocalOptions(pending_interval=15))
    assert (result.payload["status"], result.payload["interval"]) == ("Pending", 15)
    # the cid decides: the same store knows OTHER
    result = answer(version, "BootNotification", {}, knowledge, cid="OTHER")
    assert (result.payload["status"], result.payload["interval"]) == ("Accepted", 300)


def test_boot_ignores_a_garbage_remembered_interval():
    for bad in (True, -1, "300", 3.5):
        result = answer(V16, "BootNotification", {}, FakeKnowledge(boots={"CP1": bad}))
        assert result.payload["status"] == "Pending"


@pytest.mark.parametrize("version", VERSIONS)
def test_heartbeat_is_the_current_time(version):
    assert answer(version, "Heartbeat", {}).payload == {"currentTime": "2026-12-04T05:21:03Z"}
    assert answer(version, "Heartbeat", {}, now=NOW + 0.999).payload["currentTime"] \
        == "2026-12-04T05:21:03Z"


@pytest.mark.parametrize("version", VERSIONS)
def test_data_transfer_per_option(version):
    assert answer(version, "DataTransfer", {"vendorId": "v"}).payload == {"status": "Rejected"}
    assert answer(version, "DataTransfer", {"vendorId": "v"}, options=ACCEPT).payload \
        == {"status": "Accepted"}


# -- the authorization cache, 1.6 -----------------------------------------------------------

def auth16(action, status=None, expires=None, parent=None, options=REJECT, tag="TAG1"):
    auths = {} if status is None else {tag: Authorization(status, expires, parent)}
    knowledge = FakeKnowledge(auths)
    payload = {"idTag": tag} if action != "StartTransaction" else dict(
        REQUESTS_16["StartTransaction"], idTag=tag)
    result = answer(V16, action, payload, knowledge, options)
    assert knowledge.asked == [tag]
    assert result.id_key == tag
    assert VALIDATOR.check(V16, action, result.payload, True) is None
    return result.payload["idTagInfo"]


@pytest.mark.parametrize("action", ["Authorize", "StartTransaction", "StopTransaction"])
def test_16_cached_accepted_with_expiry_and_parent_copied(action):
    assert auth16(action, "Accepted") == {"status": "Accepted"}
    assert auth16(action, "Accepted", NOW + 3600, "PARENT") == {
        "status": "Accepted", "expiryDate": "2026-12-04T06:21:03Z", "parentIdTag": "PARENT"}


@pytest.mark.parametrize("action", ["Authorize", "StartTransaction", "StopTransaction"])
def test_16_expired_entry_is_expired_even_when_unknown_ids_are_accepted(action):
    for options in (REJECT, ACCEPT):
        assert auth16(action, "Accepted", NOW - 1, "P", options) == {
            "status": "Expired", "expiryDate": "2026-12-04T05:21:02Z", "parentIdTag": "P"}
    assert auth16(action, "Accepted", NOW)["status"] == "Expired"  # at the instant: passed


def test_16_refusals_stay_refusals():
    for status in ("Blocked", "Invalid", "ConcurrentTx", "Expired"):
        assert auth16("Authorize", status, options=ACCEPT) == {"status": status}
    assert auth16("Authorize", "Blocked", NOW - 10, options=ACCEPT)["status"] == "Blocked"


def test_16_unknown_ids_follow_the_option():
    assert auth16("Authorize") == {"status": "Invalid"}
    assert auth16("Authorize", options=ACCEPT) == {"status": "Accepted"}
    assert auth16("StopTransaction", options=ACCEPT) == {"status": "Accepted"}


def test_16_statuses_the_version_lacks_and_oversized_parents():
    assert auth16("Authorize", "NoCredit") == {"status": "Invalid"}
    assert auth16("Authorize", "accepted") == {"status": "Invalid"}
    assert auth16("Authorize", "Accepted", parent="P" * 21) == {"status": "Accepted"}


def test_16_a_request_without_an_id_is_invalid_whatever_the_option():
    for options in (REJECT, ACCEPT):
        result = answer(V16, "Authorize", {"idTag": 17}, options=options)
        assert result.payload == {"idTagInfo": {"status": "Invalid"}} and result.id_key is None


def test_16_start_transaction_hands_out_local_ids_also_when_not_accepted():
    knowledge = FakeKnowledge({"TAG1": Authorization("Accepted")}, first_tx=41)
    first = answer(V16, "StartTransaction", REQUESTS_16["StartTransaction"], knowledge,
                   cid="CP7")
    assert first.payload == {"idTagInfo": {"status": "Accepted"}, "transactionId": 42}
    assert (first.transaction_id, first.id_key) == (42, "TAG1")
    stranger = answer(V16, "StartTransaction", dict(REQUESTS_16["StartTransaction"],
                                                    idTag="NOBODY"), knowledge, cid="CP7")
    # OCPP 1.6 §4.8: a transaction id and a status, also for a refused idTag
    assert stranger.payload == {"idTagInfo": {"status": "Invalid"}, "transactionId": 43}
    assert stranger.transaction_id == 43
    assert knowledge.issued == [("CP7", 42), ("CP7", 43)]


def test_16_start_transaction_without_a_usable_local_id_is_an_internal_error():
    class NoIds(FakeKnowledge):
        def new_transaction_id(self, cid):
            return "7"

    result = answer(V16, "StartTransaction", REQUESTS_16["StartTransaction"], NoIds())
    assert result.payload is None and result.error.code_for(V16) == "InternalError"
    assert result.transaction_id is None


def test_16_stop_transaction_without_an_id_tag_is_empty():
    request = {k: v for k, v in REQUESTS_16["StopTransaction"].items() if k != "idTag"}
    knowledge = FakeKnowledge()
    result = answer(V16, "StopTransaction", request, knowledge)
    assert result.payload == {} and result.id_key is None and knowledge.asked == []


def test_a_failing_store_gives_a_defined_callerror():
    class Broken(FakeKnowledge):
        def authorization(self, id_key):
            raise OSError("disk on fire")

    result = answer(V16, "Authorize", {"idTag": "TAG1"}, Broken())
    assert result.payload is None and result.error.code_for(V16) == "InternalError"
    assert result.error.description.startswith("local answer failed (OSError: disk on fire)")


# -- the authorization cache, 2.x -----------------------------------------------------------

TOKEN = {"idToken": "04A1B2", "type": "ISO14443"}
TX_EVENT = {"eventType": "Started", "timestamp": T, "triggerReason": "Authorized",
            "seqNo": 0, "transactionInfo": {"transactionId": "tx-1"}}


def auth2x(version, action, auth=None, options=REJECT, token=TOKEN):
    knowledge = FakeKnowledge({} if auth is None else {"ISO14443:04A1B2": auth})
    payload = {"idToken": token} if action == "Authorize" else dict(TX_EVENT, idToken=token)
    assert VALIDATOR.check(version, action, payload, False) is None
    result = answer(version, action, payload, knowledge, options)
    assert result.id_key == f'{token["type"]}:{token["idToken"]}'
    assert VALIDATOR.check(version, action, result.payload, True) is None, result.payload
    return result.payload["idTokenInfo"]


@pytest.mark.parametrize("version", [V201, V21])
@pytest.mark.parametrize("action", ["Authorize", "TransactionEvent"])
def test_2x_cached_accepted_with_cache_expiry_and_group(version, action):
    assert auth2x(version, action, Authorization("Accepted")) == {"status": "Accepted"}
    assert auth2x(version, action, Authorization("Accepted", NOW + 60, "G1", "Local")) == {
        "status": "Accepted", "cacheExpiryDateTime": "2026-12-04T05:22:03Z",
        "groupIdToken": {"idToken": "G1", "type": "Local"}}
    info = auth2x(version, action, Authorization("Accepted", None, "G1"))
    assert info["groupIdToken"] == {"idToken": "G1", "type": "Central"}


@pytest.mark.parametrize("version", [V201, V21])
@pytest.mark.parametrize("action", ["Authorize", "TransactionEvent"])
def test_2x_lapsed_cache_entry_counts_as_unknown(version, action):
    lapsed = Authorization("Accepted", NOW - 1, "G1")
    assert auth2x(version, action, lapsed) == {"status": "Unknown"}
    assert auth2x(version, action, lapsed, ACCEPT) == {"status": "Accepted"}
    # a refusal is not turned into acceptance by the clock
    assert auth2x(version, action, Authorization("Blocked", NOW - 1), ACCEPT) == {
        "status": "Blocked"}


@pytest.mark.parametrize("version", [V201, V21])
def test_2x_unknown_ids_and_statuses(version):
    assert auth2x(version, "Authorize") == {"status": "Unknown"}
    assert auth2x(version, "Authorize", options=ACCEPT) == {"status": "Accepted"}
    for status in ("NoCredit", "NotAtThisTime", "Invalid", "Unknown"):
        assert auth2x(version, "Authorize", Authorization(status), ACCEPT) == {"status": status}
    assert auth2x(version, "Authorize", Authorization("Bogus")) == {"status": "Invalid"}


@pytest.mark.parametrize("version", [V201, V21])
def test_2x_no_authorization_tokens_are_accepted(version):
    token = {"idToken": "", "type": "NoAuthorization"}
    assert auth2x(version, "TransactionEvent", token=token) == {"status": "Accepted"}
    refused = Authorization("Blocked")
    knowledge = FakeKnowledge({"NoAuthorization:": refused})
    result = answer(version, "TransactionEvent", dict(TX_EVENT, idToken=token), knowledge)
    assert result.payload == {"idTokenInfo": {"status": "Blocked"}}  # the cache says so


@pytest.mark.parametrize("version", [V201, V21])
def test_2x_transaction_event_without_id_token_is_empty(version):
    knowledge = FakeKnowledge()
    result = answer(version, "TransactionEvent", TX_EVENT, knowledge)
    assert result.payload == {} and result.id_key is None and knowledge.asked == []


def test_id_keys():
    assert id_key(V16, "Authorize", {"idTag": "abc"}) == "abc"
    assert id_key(V16, "StopTransaction", {"transactionId": 1}) is None
    assert id_key(V16, "MeterValues", {"idTag": "abc"}) is None
    assert id_key(V201, "Authorize", {"idToken": TOKEN}) == "ISO14443:04A1B2"
    assert id_key(V21, "TransactionEvent", dict(TX_EVENT, idToken=TOKEN)) == "ISO14443:04A1B2"
    assert id_key(V21, "TransactionEvent", TX_EVENT) is None
    assert id_key(V201, "Authorize", {"idTag": "abc"}) is None
    assert id_key(V201, "Authorize", {"idToken": {"idToken": "a"}}) is None
    assert id_key(V16, "Authorize", None) is None


def test_get_certificate_chain_status_echoes_each_certificate_as_failed():
    hashes = {"hashAlgorithm": "SHA256", "issuerNameHash": "a", "issuerKeyHash": "b",
              "serialNumber": "c"}
    request = {"certificateStatusRequests": [
        {"certificateHashData": hashes, "source": "OCSP", "urls": ["http://o"]},
        {"certificateHashData": dict(hashes, serialNumber="d"), "source": "CRL",
         "urls": ["http://c"]}]}
    assert VALIDATOR.check(V21, "GetCertificateChainStatus", request, False) is None
    result = answer(V21, "GetCertificateChainStatus", request)
    assert VALIDATOR.check(V21, "GetCertificateChainStatus", result.payload, True) is None
    assert [(s["certificateHashData"]["serialNumber"], s["source"], s["status"])
            for s in result.payload["certificateStatus"]] == [
        ("c", "OCSP", "Failed"), ("d", "CRL", "Failed")]
    garbage = {"certificateStatusRequests": [{"certificateHashData": {}, "source": "OCSP"}]}
    assert answer(V21, "GetCertificateChainStatus", garbage).error.code_for(V21) \
        == "InternalError"


# -- what backend answers teach ------------------------------------------------------------

def test_learned_authorization_16():
    response = {"idTagInfo": {"status": "Accepted", "parentIdTag": "P",
                              "expiryDate": "2027-01-01T01:00:00.250+01:00"}}
    expires = calendar.timegm((2027, 1, 1, 0, 0, 0)) + 0.25
    for action in ("Authorize", "StartTransaction", "StopTransaction"):
        assert learned_authorization(V16, action, {"idTag": "T"}, response) == (
            "T", Authorization("Accepted", expires, "P"))
    assert learned_authorization(V16, "Authorize", {"idTag": "T"},
                                 {"idTagInfo": {"status": "Blocked", "expiryDate": "soon"}}) \
        == ("T", Authorization("Blocked"))
    assert learned_authorization(V16, "StopTransaction", {"transactionId": 1},
                                 {"idTagInfo": {"status": "Accepted"}}) is None
    assert learned_authorization(V16, "StopTransaction", {"idTag": "T"}, {}) is None
    assert learned_authorization(V16, "Heartbeat", {}, {"currentTime": T}) is None
    assert learned_authorization(V16, "Authorize", {"idTag": "T"}, {"idTagInfo": {}}) is None


@pytest.mark.parametrize("version", [V201, V21])
def test_learned_authorization_2x(version):
    response = {"idTokenInfo": {"status": "Accepted", "cacheExpiryDateTime": T,
                                "groupIdToken": {"idToken": "G", "type": "Central"}}}
    learned = learned_authorization(version, "Authorize", {"idToken": TOKEN}, response)
    assert learned == ("ISO14443:04A1B2", Authorization(
        "Accepted", calendar.timegm((2026, 12, 4, 5, 0, 0)), "G", "Central"))
    assert learned_authorization(version, "TransactionEvent", dict(TX_EVENT, idToken=TOKEN),
                                 {"idTokenInfo": {"status": "Invalid"}}) == (
        "ISO14443:04A1B2", Authorization("Invalid"))
    assert learned_authorization(version, "TransactionEvent", TX_EVENT, response) is None
    assert learned_authorization(version, "TransactionEvent", dict(TX_EVENT, idToken=TOKEN),
                                 {}) is None


@pytest.mark.parametrize("version,action,request_", [
    (V16, "Authorize", {"idTag": "TAG1"}), (V16, "StartTransaction", {"idTag": "TAG1"}),
    (V201, "Authorize", {"idToken": TOKEN}), (V21, "TransactionEvent", {"idToken": TOKEN})])
def test_what_is_learned_is_what_is_answered(version, action, request_):
    info = "idTagInfo" if version == V16 else "idTokenInfo"
    backend = {info: {"status": "Blocked"}}
    key, auth = learned_authorization(version, action, request_, backend)
    result = answer(version, action, dict(request_), FakeKnowledge({key: auth}))
    assert result.payload[info] == {"status": "Blocked"}
    assert disagreement(version, action, result.payload, backend) is None


def test_learned_boot_interval():
    assert learned_boot_interval("BootNotification", {"status": "Accepted", "interval": 300,
                                                      "currentTime": T}) == 300
    assert learned_boot_interval("BootNotification", {"status": "Accepted", "interval": 0}) == 0
    assert learned_boot_interval("BootNotification", {"status": "Pending", "interval": 30}) is None
    assert learned_boot_interval("BootNotification", {"status": "Accepted", "interval": True}) \
        is None
    assert learned_boot_interval("Heartbeat", {"status": "Accepted", "interval": 30}) is None
    assert learned_boot_interval("BootNotification", []) is None


@pytest.mark.parametrize("text,expected", [
    ("2026-12-04T05:21:03Z", NOW), ("2026-12-04T05:21:03.5Z", NOW + 0.5),
    ("2026-12-04T06:21:03+01:00", NOW), ("2026-12-04T00:51:03.000-0430", NOW),
    ("2026-12-04t05:21:03z", NOW), ("2026-12-04T05:21:03", NOW),
    ("2026-12-04T05:21:03.123456789Z", NOW + 0.123456789),
    ("2026-02-30T00:00:00Z", None), ("2026-12-04", None), ("yesterday", None), ("", None),
    (None, None), (1796361663, None), ("2026-12-04T05:21:03+25:00", None)])
def test_parse_time(text, expected):
    assert parse_time(text) == pytest.approx(expected) if expected else parse_time(text) is None


def test_format_time():
    assert format_time(NOW) == "2026-12-04T05:21:03Z"
    assert format_time(float("nan")) == "1970-01-01T00:00:00Z"
    assert parse_time(format_time(NOW)) == NOW


# -- disagreements --------------------------------------------------------------------------

def test_disagreements():
    said = {"idTagInfo": {"status": "Accepted"}, "transactionId": 1001}
    told = {"idTagInfo": {"status": "Invalid"}, "transactionId": 77}
    line = disagreement(V16, "StartTransaction", said, told)
    assert "idTag status Accepted locally, Invalid by the backend" in line
    assert disagreement(V16, "StartTransaction", said, dict(told, idTagInfo=said["idTagInfo"])) \
        is None  # the transaction id always differs: that is a mapping, not a disagreement
    assert "idToken status Unknown locally, Accepted by the backend" in disagreement(
        V201, "Authorize", {"idTokenInfo": {"status": "Unknown"}},
        {"idTokenInfo": {"status": "Accepted", "cacheExpiryDateTime": T}})
    boot = {"currentTime": T, "interval": 300, "status": "Accepted"}
    assert "status Accepted locally, Rejected by the backend" in disagreement(
        V21, "BootNotification", boot, dict(boot, status="Rejected"))
    assert disagreement(V16, "BootNotification", boot, dict(boot, interval=60)) is None
    assert disagreement(V16, "StopTransaction", {}, {"idTagInfo": {"status": "Blocked"}}) is None
    assert "Rejected locally, Accepted" in disagreement(
        V16, "DataTransfer", {"status": "Rejected"}, {"status": "Accepted"})
    assert disagreement(V16, "Heartbeat", {"currentTime": T}, {"currentTime": "x"}) is None
    assert disagreement(V16, "Authorize", None, {"idTagInfo": {}}) is None


# -- 1.6 transaction ids --------------------------------------------------------------------

PROFILE = {"chargingProfileId": 1, "stackLevel": 0, "chargingProfilePurpose": "TxProfile",
           "chargingProfileKind": "Relative", "transactionId": 77,
           "chargingSchedule": {"chargingRateUnit": "A",
                                "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 16}]}}


def test_upstream_transaction_ids():
    assert upstream_transaction_id(V16, "MeterValues", REQUESTS_16["MeterValues"]) == 5
    assert upstream_transaction_id(V16, "StopTransaction", REQUESTS_16["StopTransaction"]) == 5
    assert upstream_transaction_id(V16, "MeterValues", {"connectorId": 1}) is None
    assert upstream_transaction_id(V16, "StopTransaction", {"transactionId": True}) is None
    assert upstream_transaction_id(V16, "StopTransaction", {"transactionId": "5"}) is None
    assert upstream_transaction_id(V16, "RemoteStopTransaction", {"transactionId": 5}) is None
    assert upstream_transaction_id(V201, "MeterValues", {"transactionId": 5}) is None
    assert response_transaction_id(V16, "StartTransaction",
                                   {"idTagInfo": {"status": "Accepted"}, "transactionId": 9}) == 9
    assert response_transaction_id(V16, "StopTransaction", {"transactionId": 9}) is None


def test_downstream_transaction_ids():
    assert downstream_transaction_id(V16, "RemoteStopTransaction", {"transactionId": 77}) == 77
    set_profile = {"connectorId": 1, "csChargingProfiles": PROFILE}
    assert VALIDATOR.check(V16, "SetChargingProfile", set_profile, False) is None
    assert downstream_transaction_id(V16, "SetChargingProfile", set_profile) == 77
    assert downstream_transaction_id(V16, "RemoteStartTransaction",
                                     {"idTag": "T", "chargingProfile": PROFILE}) == 77
    assert downstream_transaction_id(V16, "SetChargingProfile", {"connectorId": 1}) is None
    assert downstream_transaction_id(V16, "MeterValues", REQUESTS_16["MeterValues"]) is None
    assert downstream_transaction_id(V201, "RequestStopTransaction",
                                     {"transactionId": "77"}) is None


@pytest.mark.parametrize("action,payload,getter", [
    ("MeterValues", REQUESTS_16["MeterValues"], upstream_transaction_id),
    ("StopTransaction", REQUESTS_16["StopTransaction"], upstream_transaction_id),
    ("RemoteStopTransaction", {"transactionId": 77}, downstream_transaction_id),
    ("SetChargingProfile", {"connectorId": 1, "csChargingProfiles": PROFILE},
     downstream_transaction_id),
    ("RemoteStartTransaction", {"idTag": "T", "chargingProfile": PROFILE},
     downstream_transaction_id)])
def test_with_transaction_id_replaces_a_copy(action, payload, getter):
    before = copy.deepcopy(payload)
    out = with_transaction_id(action, payload, 123456)
    assert getter(V16, action, out) == 123456
    assert payload == before  # the input is untouched
    assert VALIDATOR.check(V16, action, out, False) is None
    assert with_transaction_id(action, out, getter(V16, action, payload)) == payload


def test_with_transaction_id_leaves_other_payloads_alone():
    for action, payload in (("MeterValues", {"connectorId": 1, "meterValue": []}),
                            ("SetChargingProfile", {"connectorId": 1}),
                            ("Heartbeat", {}), ("SetChargingProfile",
                                                {"chargingProfile": {"transactionId": "x"}})):
        out = with_transaction_id(action, payload, 9)
        assert out == payload and out is not payload


# -- never raises ---------------------------------------------------------------------------

FIELDS = ["idTag", "idToken", "type", "transactionId", "status", "idTagInfo", "idTokenInfo",
          "expiryDate", "cacheExpiryDateTime", "parentIdTag", "groupIdToken", "interval",
          "csChargingProfiles", "chargingProfile", "certificateStatusRequests",
          "certificateHashData", "source", "hashAlgorithm", "issuerNameHash",
          "issuerKeyHash", "serialNumber", "currentTime"]
tokens = st.fixed_dictionaries({"idToken": st.text(max_size=40), "type": st.text(max_size=25)
                                | st.sampled_from(["ISO14443", "NoAuthorization", "Central"])})
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
           | st.sampled_from(["Accepted", "Blocked", "SHA256", "OCSP", "ISO14443",
                              "NoAuthorization", T, "2026-12-04T05:21:03+01:00"]))
json_ish = st.recursive(scalars | tokens, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner,
                                          max_size=5), max_leaves=25)
payloads = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_ish,
                           max_size=6) | json_ish
ALL_ACTIONS = sorted(set().union(*CP.values(), *CSMS.values()))
versions = st.sampled_from(VERSIONS) | st.text(max_size=8)
actions = st.sampled_from(ALL_ACTIONS) | st.text(max_size=12)
parents = st.none() | st.text(max_size=40) | st.text(alphabet="p", min_size=250, max_size=260)
auths = st.builds(Authorization, st.sampled_from(sorted(local._STATUS_2X)) | st.text(max_size=12),
                  st.none() | st.floats() | st.integers(min_value=-10**12, max_value=10**12)
                  | st.floats(min_value=NOW - 10**6, max_value=NOW + 10**6),
                  parents, st.none() | st.text(max_size=25)
                  | st.sampled_from(["Central", "Local", "eMAID"]))
options = st.builds(LocalOptions, st.sampled_from(["reject", "accept", "maybe"]),
                    st.integers(min_value=-5, max_value=10**6),
                    st.sampled_from(["reject", "accept", ""]))
times = st.floats(min_value=0, max_value=4e9) | st.sampled_from([float("nan"), NOW])
SLOW = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DOWNSTREAM = {"RemoteStopTransaction": {"transactionId": 77},
              "SetChargingProfile": {"connectorId": 1, "csChargingProfiles": PROFILE},
              "RemoteStartTransaction": {"idTag": "T", "chargingProfile": PROFILE}}
CHAIN = {"certificateStatusRequests": [{"certificateHashData": {
    "hashAlgorithm": "SHA256", "issuerNameHash": "a", "issuerKeyHash": "b", "serialNumber": "c"},
    "source": "OCSP", "urls": ["http://o"]}]}


def base_request(version, action):
    if version == V16 and action in DOWNSTREAM:
        return DOWNSTREAM[action]
    if action == "GetCertificateChainStatus":
        return CHAIN
    if action in ("Authorize", "TransactionEvent") and version != V16:
        return dict(request_for(version, action), idToken=TOKEN)
    return request_for(version, action)


def paths(node, prefix=()):
    """Every (path) to a value inside a JSON-ish value."""
    items = node.items() if isinstance(node, dict) else enumerate(node) \
        if isinstance(node, list) else ()
    for key, child in items:
        yield prefix + (key,)
        yield from paths(child, prefix + (key,))


def damage(draw, payload):
    """Up to three values anywhere in ``payload`` replaced by garbage, deleted, or added."""
    payload = copy.deepcopy(payload)
    for _ in range(draw(st.integers(0, 3))):
        where = sorted(paths(payload), key=repr)
        path = draw(st.sampled_from(where)) if where and draw(st.booleans()) else \
            (draw(st.sampled_from(FIELDS)),)
        parent = payload
        for key in path[:-1]:
            parent = parent[key]
        if not isinstance(parent, (dict, list)):
            continue
        if isinstance(parent, dict) and draw(st.booleans()):
            parent.pop(path[-1], None)
        elif isinstance(parent, dict) or path[-1] < len(parent):
            parent[path[-1]] = draw(json_ish)
    return payload


@st.composite
def near_valid(draw):
    """A damaged valid request of a CP action (or of a 1.6 downstream one)."""
    version, action = draw(st.sampled_from(CASES + [(V16, a) for a in DOWNSTREAM]))
    return version, action, damage(draw, base_request(version, action))


RESPONSES = [
    {"idTagInfo": {"status": "Accepted", "expiryDate": T, "parentIdTag": "P"},
     "transactionId": 9},
    {"idTokenInfo": {"status": "Blocked", "cacheExpiryDateTime": "2026-12-04T05:21:03.5+01:00",
                     "groupIdToken": TOKEN}},
    {"currentTime": T, "interval": 300, "status": "Accepted"}, {"status": "Rejected"}, {}]


@st.composite
def near_valid_response(draw):
    return damage(draw, draw(st.sampled_from(RESPONSES)))


class AnyKnowledge(FakeKnowledge):
    def __init__(self, auth, boot):
        super().__init__(boots={"CP1": boot})
        self.auth = auth

    def authorization(self, id_key):
        assert isinstance(id_key, str)
        return self.auth


def check_answer(version, action, payload, auth, boot, opts, now):
    result = local_answer(version, action, payload, "CP1", AnyKnowledge(auth, boot), now, opts)
    assert isinstance(result, LocalAnswer)
    assert (result.payload is None) == (result.error is not None)
    assert result.id_key is None or isinstance(result.id_key, str)
    if result.error is not None:
        assert not result.error.description.startswith("local answer failed"), result.error
    elif version in VERSIONS:
        assert VALIDATOR.check(version, action, result.payload, True) is None, result.payload


@SLOW
@given(versions, actions, payloads, st.none() | auths, st.none() | st.integers(-3, 10**6),
       options, times)
def test_local_answer_never_raises_and_answers_validly(version, action, payload, auth, boot,
                                                       opts, now):
    check_answer(version, action, payload, auth, boot, opts, now)


@SLOW
@given(near_valid(), st.none() | auths, st.none() | st.integers(-3, 10**6), options, times)
def test_local_answer_on_damaged_requests(case, auth, boot, opts, now):
    check_answer(*case, auth, boot, opts, now)


def check_the_others(version, action, request_, response, other, new_id):
    learned = learned_authorization(version, action, request_, response)
    assert learned is None or (isinstance(learned[0], str)
                               and isinstance(learned[1], Authorization)
                               and isinstance(learned[1].status, str))
    for getter in (upstream_transaction_id, downstream_transaction_id, response_transaction_id):
        tx = getter(version, action, request_)
        assert tx is None or type(tx) is int
    interval = learned_boot_interval(action, response)
    assert interval is None or type(interval) is int
    line = disagreement(version, action, response, other)
    assert line is None or isinstance(line, str)
    key = id_key(version, action, request_)
    assert key is None or isinstance(key, str)
    before = copy.deepcopy(request_)
    out = with_transaction_id(action, request_, new_id)
    assert request_ == before  # untouched
    if isinstance(request_, dict):
        assert out is not request_
    stamp = parse_time(request_)
    assert stamp is None or isinstance(stamp, float)


@SLOW
@given(versions, actions, payloads, payloads, payloads, st.integers())
def test_the_other_functions_never_raise(version, action, request_, response, other, new_id):
    check_the_others(version, action, request_, response, other, new_id)


@SLOW
@given(near_valid(), near_valid_response(), st.integers())
def test_the_other_functions_on_damaged_messages(case, response, new_id):
    version, action, request_ = case
    local_said = answer(version, action, copy.deepcopy(request_)).payload or {}
    check_the_others(version, action, request_, response, local_said, new_id)
    check_the_others(version, action, request_, local_said, response, new_id)


@given(st.text(max_size=40))
def test_parse_time_never_raises_on_text(text):
    value = parse_time(text)
    assert value is None or isinstance(value, float)


# -- purity ---------------------------------------------------------------------------------

def test_local_imports_only_stdlib_and_the_core():
    source = Path(local.__file__).read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(source)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            top = name.split(".")[0]
            assert top in sys.stdlib_module_names or name.startswith("ocpp_edge.core"), name
    code = ("import sys, ocpp_edge.core.local\n"
            "print(','.join(sorted({m.split('.')[0] for m in sys.modules}"
            " - set(sys.stdlib_module_names))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip().split(",")
    assert {m for m in loaded if not m.startswith("_")} <= {"ocpp_edge"}, loaded
