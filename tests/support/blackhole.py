"""A TCP forwarder on loopback that can be told to go silent: a network partition in a test.

`Blackhole(target_host, target_port)` listens on 127.0.0.1 (a free port) and
forwards every connection to the target. `cut()` makes it a black hole, the
"packets dropped, not refused" failure: connections stay open, every byte in
either direction is swallowed, new connections are accepted and then hear
nothing (as when a firewall drops the traffic behind an already established
path, or a NAT entry expires). `restore()` forwards again; connections opened
during the cut stay dead (their bytes are gone, as after a real partition) and
the client has to notice and reconnect.

It runs its own event loop in a thread, so a synchronous test can drive it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any


class Blackhole:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.silent = False
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="blackhole", daemon=True)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port: int = sock.getsockname()[1]
        self._sock = sock
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread.start()
        self._started.wait(5)

    # -- control (any thread) ----------------------------------------------------------
    def cut(self) -> None:
        """Swallow everything from now on, on open and new connections alike; refuse nothing."""
        self.silent = True

    def restore(self) -> None:
        self.silent = False

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # -- the loop ----------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._client, sock=self._sock)

        self._loop.run_until_complete(start())
        self._started.set()
        self._loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        born_silent = self.silent
        up_w: asyncio.StreamWriter | None = None
        try:
            if not born_silent:
                try:
                    up_r, up_w = await asyncio.open_connection(*self.target)
                except OSError:
                    return
                self._writers.add(up_w)
                lost = [False]  # shared by both directions: one lost byte kills the connection
                await asyncio.gather(self._pump(reader, up_w, lost), self._pump(up_r, writer, lost))
            else:
                await self._pump(reader, None, [True])
        finally:
            for w in (writer, up_w):
                if w is not None:
                    self._writers.discard(w)
                    w.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter | None, lost: list[bool]) -> None:
        """Copy src to dst until EOF; while cut (or for a connection born during a cut), drop the bytes.

        A connection that lost bytes stays dead after the restore: the stream it carried is corrupt."""
        while True:
            data = await src.read(65536)
            if not data:
                break
            if self.silent:
                lost[0] = True
            if lost[0] or dst is None:
                continue
            dst.write(data)
            await dst.drain()
        if dst is not None and not lost[0]:
            try:
                dst.write_eof()
            except (OSError, RuntimeError):
                pass

    def __enter__(self) -> "Blackhole":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
