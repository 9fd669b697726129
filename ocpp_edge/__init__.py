"""ocpp-edge: an OCPP-J WebSocket to MQTT gateway for EV-charging site controllers."""

__version__ = "0.1.0"
