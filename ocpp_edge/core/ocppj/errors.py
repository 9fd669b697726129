"""OCPP-J error classes, each carrying its wire code per protocol version.

::

    OcppEdgeError (ocpp_edge.errors)
    └── OcppError                     the peer sent something we must answer with a CALLERROR
        ├── FormatViolation           1.6 "FormationViolation" (sic), 2.x "FormatViolation"
        ├── RpcFrameworkError         2.x only; 1.6 has no RPC-level code: FormationViolation
        ├── MessageTypeNotSupported   2.x only; 1.6: FormationViolation
        ├── ProtocolError
        ├── PropertyConstraintViolation
        ├── OccurrenceConstraintViolation   1.6 "OccurenceConstraintViolation" (sic)
        ├── TypeConstraintViolation
        ├── NotImplementedError_      "NotImplemented"
        ├── NotSupported
        ├── InternalError
        ├── SecurityError
        └── GenericError

Code tables: OCPP-J 1.6 §4.2.3; OCPP 2.0.1 Part 4 §4.3; OCPP 2.1 Part 4 §4.3.
The fault is always the peer's, except ``InternalError`` (ours).
"""

from __future__ import annotations

from ocpp_edge.core.ocppj.messages import Version
from ocpp_edge.errors import OcppEdgeError

# "-1" is the id of a CALLERROR answering a message whose id could not be read
# (OCPP 2.0.1 Part 4 §4.2.3); 1.6 has no rule, we use the same value.
UNKNOWN_ID = "-1"


class OcppError(OcppEdgeError):
    code_16 = "GenericError"
    code_2x = "GenericError"

    def __init__(self, description: str, unique_id: str = UNKNOWN_ID,
                 details: dict | None = None) -> None:
        super().__init__(description)
        self.description = description
        self.unique_id = unique_id
        self.details = details if details is not None else {}
        # The MessageTypeId of the offending frame, when it could be read.
        self.type_id: int | None = None

    def code_for(self, version: str) -> str:
        return self.code_16 if version == Version.V16 else self.code_2x


class FormatViolation(OcppError):
    code_16 = "FormationViolation"
    code_2x = "FormatViolation"


class RpcFrameworkError(OcppError):
    code_16 = "FormationViolation"
    code_2x = "RpcFrameworkError"


class MessageTypeNotSupported(OcppError):
    code_16 = "FormationViolation"
    code_2x = "MessageTypeNotSupported"


class ProtocolError(OcppError):
    code_16 = code_2x = "ProtocolError"


class PropertyConstraintViolation(OcppError):
    code_16 = code_2x = "PropertyConstraintViolation"


class OccurrenceConstraintViolation(OcppError):
    code_16 = "OccurenceConstraintViolation"
    code_2x = "OccurrenceConstraintViolation"


class TypeConstraintViolation(OcppError):
    code_16 = code_2x = "TypeConstraintViolation"


class NotImplementedError_(OcppError):  # noqa: N801 - the builtin name is taken
    code_16 = code_2x = "NotImplemented"


class NotSupported(OcppError):
    code_16 = code_2x = "NotSupported"


class InternalError(OcppError):
    code_16 = code_2x = "InternalError"


class SecurityError(OcppError):
    code_16 = code_2x = "SecurityError"


class GenericError(OcppError):
    pass
