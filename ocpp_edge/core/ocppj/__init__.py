"""Sans-I/O OCPP-J: message types, the wire codec and the protocol's error codes.

Imports nothing but the standard library; everything here is driven with strings.
"""
