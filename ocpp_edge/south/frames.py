"""Reading WebSocket frames in batches: Tornado's RFC 6455 protocol with a cheaper reader.

Tornado's ``WebSocketProtocol13`` reads every frame with three or four awaited
``read_bytes`` calls (header, extended length, mask, payload), each a Future and a trip
through the stream's buffer: on a site controller that is the largest single cost per
OCPP message after the JSON work. ``BatchReadProtocol`` replaces only the reading loop:
one ``read_bytes(..., partial=True)`` takes whatever the socket has, every complete frame
in it is parsed in place, and the rest of a frame whose header has arrived is read in one
exact ``read_bytes``. Everything else (the handshake, writing, close handshake, pings,
UTF-8 decoding and the handler callbacks) stays Tornado's: each complete message goes
through Tornado's own ``_handle_message``.

The rules are RFC 6455's and Tornado's, checked in the same order as
``WebSocketProtocol13._receive_frame`` (tornado 6.2 to 6.5 alike):

* reserved bits without a negotiated extension → abort (§5.2);
* a control frame longer than 125 bytes or fragmented → abort (§5.5);
* a continuation without a start, or a new message inside a fragmented one → abort (§5.4);
* a message longer than ``max_message_size``, counted at the frame header before its
  payload is buffered → close 1009 (§7.4.1), so a peer cannot make the gateway buffer
  more than that;
* client frames are unmasked with Tornado's own (C-accelerated) ``_websocket_mask``.

Writing: ``send_text`` writes a text frame the way Tornado's ``write_message`` does, minus
the Task that ``write_message`` wraps around every write only to translate the exception
type for callers that await it; the gateway never awaits a frame it queues.

Fairness: a charge point sending frames back to back can fill each read with many of
them; after ``YIELD_EVERY`` messages (or ``YIELD_BYTES`` of payload) the loop yields to the
event loop once, so one busy socket cannot starve the others or the timers (tornado 6.5
added the same to its own loop; 6.2 has none).
"""

from __future__ import annotations

import asyncio
import struct

from tornado.iostream import StreamClosedError
from tornado.util import _websocket_mask
from tornado.websocket import WebSocketProtocol13

_FIN = 0x80
_RSV = 0x70
_RSV1 = 0x40
_OPCODE = 0x0F
_MASKED = 0x80
_LEN = 0x7F
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")

READ_CHUNK = 65536
YIELD_EVERY = 32  # messages from one socket between two turns of the event loop
YIELD_BYTES = 256 * 1024


class BatchReadProtocol(WebSocketProtocol13):
    """``WebSocketProtocol13`` whose frames are read in batches (module docstring)."""

    def send_text(self, text: str) -> None:
        """Queue one text frame; raises ``StreamClosedError`` if the socket is gone."""
        if self._compressor is not None:
            self.write_message(text)  # permessage-deflate: Tornado's own path
            return
        data = text.encode()
        self._message_bytes_out += len(data)
        self._write_frame(True, 0x1, data)

    async def _receive_frame_loop(self) -> None:
        try:
            await self._read_frames()
        except StreamClosedError:
            self._abort()
        finally:
            self.handler.on_ws_connection_close(self.close_code, self.close_reason)

    async def _read_frames(self) -> None:  # noqa: C901 (one loop, RFC 6455 §5.2 in order)
        stream = self.stream
        limit = self.params.max_message_size
        data = b""  # received, not yet parsed; always starts at a frame boundary
        work = 0
        budget = 0
        while not self.client_terminated:
            chunk = await stream.read_bytes(READ_CHUNK, partial=True)
            self._wire_bytes_in += len(chunk)
            data = data + chunk if data else chunk
            pos = 0
            end = len(data)
            while end - pos >= 2:
                b0 = data[pos]
                b1 = data[pos + 1]
                opcode = b0 & _OPCODE
                control = opcode & 0x8
                reserved = b0 & _RSV
                if self._decompressor is not None and opcode != 0:
                    self._frame_compressed = bool(reserved & _RSV1)
                    reserved &= ~_RSV1
                if reserved:
                    self._abort()  # an extension that was not negotiated
                    return
                length = b1 & _LEN
                head = 2
                if control and length >= 126:
                    self._abort()  # control frames carry at most 125 bytes
                    return
                if length == 126:
                    if end - pos < 4:
                        break
                    length = _U16.unpack_from(data, pos + 2)[0]
                    head = 4
                elif length == 127:
                    if end - pos < 10:
                        break
                    length = _U64.unpack_from(data, pos + 2)[0]
                    head = 10
                fragments = self._fragmented_message_buffer
                if length + (len(fragments) if fragments is not None else 0) > limit:
                    self.close(1009, "message too big")
                    self._abort()
                    return
                masked = b1 & _MASKED
                if masked:
                    head += 4
                frame_end = pos + head + length
                if frame_end > end:
                    # The header is here, the payload is not: read exactly the rest.
                    rest = await stream.read_bytes(frame_end - end)
                    self._wire_bytes_in += len(rest)
                    data = data[pos:] + rest
                    frame_end -= pos
                    pos = 0
                    end = len(data)
                payload = data[pos + head:frame_end]
                if masked:
                    payload = _websocket_mask(data[pos + head - 4:pos + head], payload)
                pos = frame_end
                final = b0 & _FIN
                if control:
                    if not final:
                        self._abort()  # control frames must not be fragmented
                        return
                elif opcode == 0:  # continuation
                    if fragments is None:
                        self._abort()  # nothing to continue
                        return
                    fragments += payload
                    if not final:
                        continue
                    opcode = self._fragmented_message_opcode
                    payload = bytes(fragments)
                    self._fragmented_message_buffer = None
                else:  # the first frame of a message
                    if fragments is not None:
                        self._abort()  # a new message before the last one ended
                        return
                    if not final:
                        self._fragmented_message_opcode = opcode
                        self._fragmented_message_buffer = bytearray(payload)
                        continue
                handled = self._handle_message(opcode, payload)
                if handled is not None:
                    await handled  # the handler pacing this charge point (max_message_rate)
                if self.client_terminated:
                    return
                work += 1
                budget += length
                if work >= YIELD_EVERY or budget >= YIELD_BYTES:
                    work = budget = 0
                    await asyncio.sleep(0)
                    if self.client_terminated:
                        return
            data = data[pos:] if pos < end else b""
