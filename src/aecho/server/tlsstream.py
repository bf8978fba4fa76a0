"""TLS of the server's own: a record layer in memory on top of the plain TCP transport.

The loop's TLS transports (asyncio's and uvloop's SSLProtocol) write nothing once the
peer's close_notify has arrived, so a peer that ends its input with one (``openssl
s_client`` at end of input, a client that unwraps, an ``aecho client`` pipe) lost the
replies still owed to it.  Here the connection runs ``SSLContext.wrap_bio`` over a pair
of :class:`ssl.MemoryBIO` itself: a close_notify (or a TCP half-close without one) is the
end of input, as a TCP half-close is without TLS; the replies owed are still encrypted
and written, then the server's own close_notify, then the close (or the lingering close,
see server.connection).

:class:`TlsStream` is both the protocol of the TCP transport and the transport of the
connection that serves the peer: one object, no extra call per read or write.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

# Plaintext asked of the record layer per read: one record's most.  Each read allocates
# this much first, so no more (a larger buffer costs an mmap per read under uvloop).
READ_CHUNK = 16 * 1024

_TLS_EXTRA = ("ssl_object", "sslcontext", "peercert", "cipher", "compression")


class TlsStream(asyncio.Protocol, asyncio.Transport):
    """One TLS connection: the handshake, then records both ways, then the close.

    ``ready`` is called once the handshake is done, from within the read that finished
    it (so the peer's first bytes, often in that same read, reach whoever it installs
    with :meth:`set_protocol`).  ``handshake`` is done then, or fails with the reason the
    handshake did not finish.
    """

    __slots__ = (
        "_app",
        "_eof",
        "_in",
        "_out",
        "_ready",
        "_shut",
        "_ssl",
        "_tcp",
        "handshake",
        "shaken",
    )

    def __init__(self, context: ssl.SSLContext, ready: Callable[[TlsStream], None]) -> None:
        super().__init__()
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._in, self._out, server_side=True)
        self._ready: Callable[[TlsStream], None] | None = ready
        self._tcp: asyncio.Transport | None = None
        self._app: asyncio.Protocol | None = None
        self._eof = False  # the peer's input ended (close_notify, or TCP EOF)
        self._shut = False  # our close_notify is out: nothing more may be written
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.shaken = False  # the handshake is done and the stream handed over

    # -- the protocol of the TCP transport --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._tcp = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._eof:
            return  # after the peer's close_notify nothing it sends is its input: dropped
        self._in.write(data)
        if not self.shaken and (not self._shake() or self.is_closing()):
            return  # the handshake goes on, failed, or its connection was refused
        self._read()

    def eof_received(self) -> bool:
        if not self.shaken:
            self._fail(ConnectionResetError("the peer closed during the TLS handshake"))
            return False
        # A TCP half-close, with or without a close_notify before it: the end of input.
        # Not told to the record layer: an EOF there without a close_notify would break
        # the session (an alert out, nothing more written), and the replies are owed.
        if not self._eof:
            self._end_of_input()
        return True  # whoever serves the peer closes, once done

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.shaken:
            self._fail(exc or ConnectionResetError("the peer closed during the TLS handshake"))
            return
        if self._app is not None:
            app, self._app = self._app, None
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()

    def _shake(self) -> bool:
        """Take the handshake a step further; True once it is done (and handed over)."""
        if self._ready is None:
            return False  # it failed: the transport is going
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except (ssl.SSLError, ValueError) as exc:
            self._flush()  # the alert, if there is one, on its way before the close
            self._fail(exc, alert=True)
            return False
        self._flush()
        ready, self._ready = self._ready, None
        self.shaken = True
        if not self.handshake.done():
            self.handshake.set_result(None)
        assert ready is not None
        ready(self)
        return True

    def _fail(self, exc: BaseException, alert: bool = False) -> None:
        self._ready = None
        if not self.handshake.done():
            self.handshake.set_exception(exc)
        if self._tcp is not None:
            if alert:
                self._tcp.close()  # after the alert
            else:
                self._tcp.abort()

    def _read(self) -> None:
        """Decrypt what has come and hand it over in one piece; then the end of input."""
        chunks: list[bytes] = []
        ended = False
        tls = self._ssl
        incoming = self._in
        try:
            while True:
                chunk = tls.read(READ_CHUNK)
                if not chunk:
                    ended = True  # an empty read: the peer's close_notify
                    break
                chunks.append(chunk)
                if not incoming.pending and not tls.pending():
                    break  # all taken: one more read would only raise SSLWantReadError
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            ended = True  # the peer's close_notify after ours
        except ssl.SSLError:
            if self._tcp is not None:
                self._tcp.abort()  # a corrupt record: nothing more can be read or written
            return
        if self._out.pending:
            self._flush()  # a key update or a ticket the read produced
        app = self._app
        if app is None:
            return
        if chunks:
            app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if ended:
            self._end_of_input()

    def _end_of_input(self) -> None:
        self._eof = True
        app = self._app
        if app is None or self.is_closing():
            return
        if not app.eof_received():
            self.close()

    def _flush(self) -> None:
        if self._out.pending and self._tcp is not None:
            self._tcp.write(self._out.read())

    # -- the transport of the connection that serves the peer --------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app  # type: ignore[return-value]

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in _TLS_EXTRA:
            if name == "ssl_object":
                return self._ssl
            if name == "sslcontext":
                return self._ssl.context
            if name == "peercert":
                return self._ssl.getpeercert()
            if name == "cipher":
                return self._ssl.cipher()
            return self._ssl.compression()
        if self._tcp is None:
            return default
        return self._tcp.get_extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self._shut or self._tcp is None or self._tcp.is_closing():
            return
        try:
            self._ssl.write(data)  # a memory BIO takes it all: no partial write
        except ssl.SSLError:
            self._tcp.abort()  # the session is broken: nothing can be written
            return
        self._tcp.write(self._out.read())

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Our close_notify, then the TCP half-close: the peer may still send (and we
        read and drop it, see the lingering close), we write nothing more."""
        self._shutdown()
        if self._tcp is not None and not self._tcp.is_closing() and self._tcp.can_write_eof():
            self._tcp.write_eof()

    def _shutdown(self) -> None:
        if self._shut or not self.shaken:
            return
        self._shut = True
        try:
            self._ssl.unwrap()
        except ssl.SSLWantReadError:
            pass  # our close_notify is written; the peer's has not come (yet)
        except (ssl.SSLError, ValueError):
            return
        self._flush()

    def close(self) -> None:
        """Our close_notify after everything written, then the TCP close (once flushed)."""
        if self._tcp is None or self._tcp.is_closing():
            return
        self._shutdown()
        self._tcp.close()

    def abort(self) -> None:
        if self._tcp is not None:
            self._tcp.abort()

    def is_closing(self) -> bool:
        return self._tcp is None or self._tcp.is_closing()

    def is_reading(self) -> bool:
        return self._tcp is not None and self._tcp.is_reading()

    def pause_reading(self) -> None:
        if self._tcp is not None:
            self._tcp.pause_reading()

    def resume_reading(self) -> None:
        if self._tcp is not None:
            self._tcp.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._tcp is not None:
            self._tcp.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return 0 if self._tcp is None else self._tcp.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0) if self._tcp is None else self._tcp.get_write_buffer_limits()
