"""A deliberately tiny HTTP/1.1 upstream for the benchmark.

Raw asyncio `Protocol`, keep-alive, one fixed 2-byte JSON response per request.
It parses only what it must (the end of the header block and Content-Length,
so pipelined or bodied requests stay framed correctly); it is meant to cost far
less CPU per request than any proxy in front of it, so the proxy is what a
benchmark measures. A request that reaches it with an `Authorization` or
`Proxy-Authorization` header gets `X-Bench-Credential-Seen: 1` in its answer, so
the benchmark's pre-flight can prove Proctor strips the agent's credential.

    python bench/upstream.py --port 18000
"""

from __future__ import annotations

import argparse
import asyncio
import signal

BODY = b'{}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n" + BODY
)
CLOSE_RESPONSE = RESPONSE.replace(b"keep-alive", b"close")
SEEN = b"X-Bench-Credential-Seen: 1\r\n"
_SEEN_AT = RESPONSE.index(b"Connection:")
SEEN_RESPONSE = RESPONSE[:_SEEN_AT] + SEEN + RESPONSE[_SEEN_AT:]
SEEN_CLOSE_RESPONSE = CLOSE_RESPONSE[:_SEEN_AT] + SEEN + CLOSE_RESPONSE[_SEEN_AT:]


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = ("buf", "transport")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        out = []
        close = False
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end]
            length = 0
            lower = head.lower()
            i = lower.find(b"\r\ncontent-length:")
            if i >= 0:
                j = lower.find(b"\r\n", i + 2)
                length = int(lower[i + 17 : j if j >= 0 else len(lower)].strip() or 0)
            total = end + 4 + length
            if len(buf) < total:
                break
            if b"\r\nconnection: close" in lower:
                close = True
            buf = buf[total:]
            if b"\r\nauthorization:" in lower or b"\r\nproxy-authorization:" in lower:
                out.append(SEEN_CLOSE_RESPONSE if close else SEEN_RESPONSE)
            else:
                out.append(CLOSE_RESPONSE if close else RESPONSE)
            if close:
                break
        self.buf = buf
        if out:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])  # type: ignore[attr-defined]
        if close:
            self.transport.close()


async def main(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, host, port, backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"upstream listening on {host}:{port}", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    asyncio.run(main(a.host, a.port))
