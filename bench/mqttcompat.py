"""Benchmark-only helpers around paho-mqtt (1.6.1 and 2.x), shared by floor.py and backend.py.

Never imported by the product.  Two things live here:

* ``new_client()``: the CallbackAPIVersion shim, plus the settings every bench MQTT client
  wants (no in-flight limit, no queue limit).
* ``LoopDriver``: drives a paho client from the running asyncio loop (which is also the
  Tornado IOLoop), without ``loop_start()`` and its thread.  The socket is registered with
  ``add_reader``; ``loop_misc`` runs from a 1 s periodic timer (keepalive pings, retries).
"""

import asyncio
import socket

import paho.mqtt.client as mqtt

PAHO2 = hasattr(mqtt, "CallbackAPIVersion")


def new_client(client_id):
    """A paho client speaking MQTT 3.1.1 with the same callback signatures on 1.6 and 2.x."""
    if PAHO2:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=mqtt.MQTTv311)
    else:
        c = mqtt.Client(client_id=client_id, protocol=mqtt.MQTTv311)
    # With a positive in-flight limit paho rescans its whole outgoing dict on every PUBACK
    # (notes/performance.md); 0 means "no limit" and skips that bookkeeping.
    c.max_inflight_messages_set(0)
    c.max_queued_messages_set(0)
    return c


def rc_value(rc):
    """paho 2.x passes ReasonCode/IntEnum objects, 1.6 plain ints."""
    if hasattr(rc, "value"):
        return rc.value
    return int(rc)


def set_nodelay(sock):
    """paho never sets TCP_NODELAY; without it loopback round trips take ~40 ms (Nagle)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


class LoopDriver:
    """Run a paho client on the current asyncio/Tornado loop.

    ``writes="direct"``: no ``on_socket_register_write`` callback is installed, so
    paho writes a queued packet straight away when ``publish()`` is called outside a paho
    callback; whatever is still pending afterwards (a publish made inside ``on_message``, a
    PUBACK, a partial write on a full socket) is flushed by ``kick()`` and, only if the kernel
    buffer is full, by a temporary writer callback.

    ``writes="register"`` (default): the shape from notes/packaging.md §5.2 -- paho asks
    for a writer via ``on_socket_register_write`` when its queue becomes non-empty and the
    loop calls ``loop_write`` on its next turn, which sends everything queued meanwhile.
    Measured with bench/run.py on the floor (closed loop, 2-core VM): "register" answered
    ~15 % more CALLs/s than "direct" at ~15 % less CPU per CALL, and Mosquitto's CPU per
    CALL dropped too -- the writes of one loop turn reach the broker together.  A variant
    flushing from ``call_soon`` instead of a writability event was no better than
    "register", so it is not kept.
    """

    def __init__(self, client, writes="register"):
        self.c = client
        self.loop = asyncio.get_running_loop()
        self.sock = None
        self.writing = False
        self.misc_handle = None
        self.mode = writes
        client.on_socket_open = self._on_open
        client.on_socket_close = self._on_close
        if writes == "register":
            client.on_socket_register_write = self._on_register_write
            client.on_socket_unregister_write = self._on_unregister_write
        elif writes != "direct":
            raise ValueError("writes must be 'direct' or 'register'")

    # -- socket lifecycle ------------------------------------------------------------------
    def _on_open(self, client, userdata, sock):
        self.sock = sock
        set_nodelay(sock)
        self.loop.add_reader(sock, self._readable)
        self._schedule_misc()

    def _on_close(self, client, userdata, sock):
        self.loop.remove_reader(sock)
        if self.writing:
            self.loop.remove_writer(sock)
            self.writing = False
        if self.misc_handle is not None:
            self.misc_handle.cancel()
            self.misc_handle = None
        self.sock = None

    def _schedule_misc(self):
        self.misc_handle = self.loop.call_later(1.0, self._misc)

    def _misc(self):
        self.c.loop_misc()
        self.kick()
        if self.sock is not None:
            self._schedule_misc()

    # -- reading / writing -----------------------------------------------------------------
    def _readable(self):
        self.c.loop_read()
        self.kick()

    def kick(self):
        """Flush what paho has queued (direct mode only; register mode flushes itself)."""
        if self.mode != "direct" or self.sock is None or self.writing:
            return
        if self.c.want_write():
            self.c.loop_write()
            if self.c.want_write():        # kernel buffer full: wait for writability
                self.writing = True
                self.loop.add_writer(self.sock, self._writable)

    def _writable(self):
        self.c.loop_write()
        if not self.c.want_write() and self.writing and self.sock is not None:
            self.writing = False
            self.loop.remove_writer(self.sock)

    def _on_register_write(self, client, userdata, sock):
        if not self.writing:
            self.writing = True
            self.loop.add_writer(sock, client.loop_write)

    def _on_unregister_write(self, client, userdata, sock):
        if self.writing:
            self.writing = False
            self.loop.remove_writer(sock)
