"""Closed connections are released: the engine patches must not keep them alive.

Runs mitmproxy with Proctor's engine patches in a child process (the patches change
mitmproxy classes process-wide) and counts the connection handlers still alive
after many closed connections.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import ROOT, free_port

SCRIPT = textwrap.dedent(
    """
    import asyncio, gc, sys
    from mitmproxy.proxy.mode_servers import ProxyConnectionHandler
    from proxy.engine.patches import _CLIENT_TURNS, install_engine_patches
    from proxy.server import engine_master

    class Noop:
        pass

    async def main(port, n):
        install_engine_patches()
        master = engine_master(dict(mode=[f"regular@127.0.0.1:{port}"], connection_strategy="lazy",
                                    http2=False, http3=False), Noop())
        task = asyncio.create_task(master.run())
        for _ in range(100):
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        for _ in range(n):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET http://127.0.0.1:9/ HTTP/1.1\\r\\nHost: 127.0.0.1:9\\r\\n\\r\\n")
            await w.drain()
            await r.read(100)
            w.close()
        await asyncio.sleep(1.0)
        gc.collect()
        alive = sum(1 for o in gc.get_objects() if isinstance(o, ProxyConnectionHandler))
        print(alive, len(_CLIENT_TURNS))
        master.shutdown()
        await task

    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
    """
)


def test_closed_connections_are_not_kept_alive():
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(free_port()), "200"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    alive, turns = map(int, out.stdout.split()[-2:])
    assert turns == 0
    assert alive <= 2, f"{alive} connection handlers still alive after 200 closed connections"
