"""Bare mitmproxy: the baseline Proctor is compared against.

mitmproxy 11 embedded as a library exactly as `proxy/server.py:serve()` embeds
it -- the same minimal addon set (Core, Proxyserver, DisableH2C, NextLayer,
TlsConfig) and the same engine options (regular mode, lazy connection
strategy, rawtcp off, keep_host_header, body size limit, websocket, no HTTP/3)
-- plus one addon whose async `request` and `response` hooks do nothing. The
difference between this process and `proctor run` is therefore Proctor's own
work (identity, classification, Cedar, decision record, header handling).

With `--reverse-to URL` the listener is a reverse proxy (mitmproxy's
`reverse:URL@host:port`, the mode Proctor's mitmproxy gateway engine uses)
sending every request to URL, with the same engine options: the baseline for
gateway mode.

    python bench/bare_mitm.py --port 18001 --confdir /tmp/bare-ca
    python bench/bare_mitm.py --port 18002 --confdir /tmp/bare-ca --reverse-to http://127.0.0.1:18000
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal



class NoopAddon:
    """Async hooks that do nothing: the cost of mitmproxy invoking an addon."""

    def __init__(self) -> None:
        self.running_seen = False

    def running(self) -> None:
        self.running_seen = True
        print("bare mitmproxy running", flush=True)

    async def request(self, flow) -> None:
        return None

    async def response(self, flow) -> None:
        return None


def options_for(host: str, port: int, confdir: str, reverse_to: str | None = None) -> dict:
    """Proctor's own engine options (proxy/server.py:mitm_options_for) for a forward-proxy-only
    config; with `reverse_to`, the same options with the one listener in reverse mode instead."""
    from pathlib import Path

    from proxy.config import Listen, ProctorConfig
    from proxy.server import mitm_options_for

    config = ProctorConfig(state_dir=Path(confdir).parent, listen=Listen(host=host, port=port))
    options = {**mitm_options_for(config), "confdir": confdir}
    if reverse_to:
        options["mode"] = [f"reverse:{reverse_to}@{host}:{port}"]
    return options


async def serve(host: str, port: int, confdir: str, reverse_to: str | None = None) -> None:
    from proxy.server import engine_master

    master = engine_master(options_for(host, port, confdir, reverse_to), NoopAddon())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, master.shutdown)
    # Same GC treatment as proxy/server.py, so the baseline is not handicapped.
    import gc

    gc.collect()
    gc.freeze()
    await master.run()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--confdir", required=True, help="where mitmproxy keeps (generates) its CA")
    ap.add_argument("--reverse-to", default=None, metavar="URL",
                    help="listen as a reverse proxy to URL (gateway mode) instead of a forward proxy")
    a = ap.parse_args()
    # Same logging posture as `proctor run --log-level info` (mitmproxy at WARNING).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)
    asyncio.run(serve(a.host, a.port, a.confdir, a.reverse_to))
