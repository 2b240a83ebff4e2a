"""uvicorn's httptools protocol (llhttp, in C) with the bound on a request's head that h11 had.

llhttp itself accepts a head of any length, uvicorn keeps every piece of the URL and every
header it is handed, and httptools gathers a header's value until its line ends: left so, one
client could grow the server's memory without end. Here a head is counted twice: the URL and
header lines as they are handed over (exact), and the bytes read while a head is unfinished (a
header line still growing). Past :data:`MAX_HEAD_BYTES` the parse stops and the client gets
``431 Request Header Fields Too Large`` and a closed connection (RFC 6585 section 5). What is
held per connection is then at most the bound plus one read.

httptools replaced h11 for speed: it parses in C where h11 parses in Python, about a quarter of
a small API request's time on this project's 2-core target (bench/README.md, "api_queries").
"""

from __future__ import annotations

from typing import Final

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: The most bytes of request line and header fields one request may send (h11's setting was
#: the same 64 KiB; browsers send a few KiB, nginx's default allows 4 x 8 KiB).
MAX_HEAD_BYTES: Final = 64 * 1024
#: Per header line: ": " and CRLF, which llhttp does not hand over.
_LINE_OVERHEAD: Final = 4


class HeadTooLarge(Exception):
    """Raised inside a parser callback: llhttp stops, uvicorn answers (see below)."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` refusing a request head over :data:`MAX_HEAD_BYTES` (431)."""

    _head_bytes = 0
    _head_refused = False
    #: Bytes read since the head in progress began (reset once a head is complete).
    _unfinished = 0
    _in_head = True

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._unfinished += len(data)
        super().data_received(data)
        if self._in_head and self._unfinished > MAX_HEAD_BYTES and not self._head_refused:
            self._head_refused = True  # a header line still growing past the bound
            self.send_400_response("")

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._unfinished = 0  # what follows in this read is body (or the next request)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head = True
        super().on_message_complete()

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > MAX_HEAD_BYTES:
            self._head_refused = True
            raise HeadTooLarge

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + _LINE_OVERHEAD)
        super().on_header(name, value)

    def send_400_response(self, msg: str) -> None:
        """uvicorn answers every parse error with this; a head refused here is a 431."""
        if not self._head_refused:
            super().send_400_response(msg)
            return
        text = f"the request head is over the limit of {MAX_HEAD_BYTES} bytes\n".encode()
        lines = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
        lines += [n + b": " + v + b"\r\n" for n, v in self.server_state.default_headers]
        lines += [
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: " + str(len(text)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
            text,
        ]
        self.transport.write(b"".join(lines))
        self.transport.close()


__all__ = ["MAX_HEAD_BYTES", "BoundedHttpToolsProtocol"]
