"""Load generation for bench/run.py: wrk when installed, else a Python fallback.

Both generators run the same closed-loop model so their numbers mean the same:
`connections` keep-alive connections, each sending one request, waiting for the
complete response, pausing a think time (exponentially distributed with mean
`think_ms`, so arrivals are Poisson-like and connections never phase-lock into
bursts; 0 = no pause), and sending the next. Latency
is measured per request from just before the request is written to the last
byte of the response (think time excluded). Every response's status is read;
non-2xx responses and socket errors are counted and reported.

The Python generator uses raw asyncio protocols (no HTTP library) in several
worker processes; its own per-request overhead is a few tens of microseconds,
identical for every configuration, so comparisons stay fair, but absolute
latencies read slightly higher than wrk's.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
LUA_SCRIPT = BENCH_DIR / "proxy.lua"


@dataclass
class Target:
    """Where to connect and what to send."""

    connect_host: str
    connect_port: int
    request_target: str  # "/items/1" or "http://127.0.0.1:PORT/items/1"
    host_header: str
    proxy_authorization: str = ""  # the agent's credential, sent in `auth_header` when set
    auth_header: str = "Proxy-Authorization"  # a forward proxy's; "Authorization" for a gateway

    def request_bytes(self, user_agent: str = "proctor-bench/python") -> bytes:
        lines = [
            f"GET {self.request_target} HTTP/1.1",
            f"Host: {self.host_header}",
            f"User-Agent: {user_agent}",
        ]
        if self.proxy_authorization:
            lines.append(f"{self.auth_header}: {self.proxy_authorization}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class LoadResult:
    generator: str
    connections: int
    think_ms: float
    duration_s: float
    requests: int
    non2xx: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    extra: dict = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


def have_wrk() -> str | None:
    return shutil.which("wrk")


# ----------------------------------------------------------------------- wrk
def run_wrk(
    target: Target,
    connections: int,
    duration_s: float,
    think_ms: float = 0,
    threads: int = 1,
    cpus: list[int] | None = None,
) -> LoadResult:
    wrk = have_wrk()
    assert wrk, "wrk is not installed"
    env = dict(
        os.environ,
        BENCH_TARGET=target.request_target,
        BENCH_HOST=target.host_header,
        BENCH_AUTH=target.proxy_authorization,
        BENCH_AUTH_HEADER=target.auth_header,
        BENCH_THINK_MS=str(round(think_ms)),
    )
    cmd = [
        wrk,
        f"-t{max(1, min(threads, connections))}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "5s",
        "-s",
        str(LUA_SCRIPT),
        f"http://{target.connect_host}:{target.connect_port}",
    ]
    if cpus:
        cmd = ["taskset", "-c", ",".join(map(str, cpus)), *cmd]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration_s + 30, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCHJSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    d = json.loads(line[len("BENCHJSON ") :])
    errors = d["err_connect"] + d["err_read"] + d["err_write"] + d["err_timeout"]
    return LoadResult(
        generator="wrk",
        connections=connections,
        think_ms=round(think_ms),
        duration_s=d["duration_us"] / 1e6,
        requests=d["responses"],
        non2xx=d["non2xx"],
        errors=errors,
        p50_ms=d["p50_us"] / 1000,
        p90_ms=d["p90_us"] / 1000,
        p99_ms=d["p99_us"] / 1000,
        mean_ms=d["mean_us"] / 1000,
        max_ms=d["max_us"] / 1000,
        extra={"wrk_requests_started": d["requests"]},
    )


# ------------------------------------------------------------ python fallback
class _Conn(asyncio.Protocol):
    def __init__(self, worker: _Worker) -> None:
        self.w = worker
        self.buf = b""
        self.t0 = 0
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.w.think_s > 0:  # stagger the first requests too
            asyncio.get_running_loop().call_later(random.uniform(0, self.w.think_s), self.send)
        else:
            self.send()

    def send(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if time.monotonic() >= self.w.deadline:
            self.transport.close()
            return
        self.t0 = time.perf_counter_ns()
        self.transport.write(self.w.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end]
            lower = head.lower()
            length = 0
            i = lower.find(b"\r\ncontent-length:")
            if i >= 0:
                j = lower.find(b"\r\n", i + 2)
                length = int(lower[i + 17 : j if j >= 0 else len(lower)].strip() or 0)
            total = end + 4 + length
            if len(buf) < total:
                break
            status = int(head[9:12])
            buf = buf[total:]
            self.w.record(time.perf_counter_ns() - self.t0, status)
            if b"\r\nconnection: close" in lower:
                self.transport.close()
                self.buf = b""
                return
            if self.w.think_s > 0:
                asyncio.get_running_loop().call_later(random.expovariate(1 / self.w.think_s), self.send)
            else:
                self.send()
        self.buf = buf

    def connection_lost(self, exc) -> None:
        if time.monotonic() < self.w.deadline:
            self.w.errors += 1
        if not self.closed.done():
            self.closed.set_result(None)


class _Worker:
    def __init__(self, request: bytes, think_s: float, deadline: float) -> None:
        self.request = request
        self.think_s = think_s
        self.deadline = deadline
        self.latencies = array("q")
        self.non2xx = 0
        self.errors = 0

    def record(self, ns: int, status: int) -> None:
        if time.monotonic() <= self.deadline:
            self.latencies.append(ns)
            if not 200 <= status <= 299:
                self.non2xx += 1


def _worker_main(target: Target, conns: int, think_s: float, start_at: float, duration_s: float, cpus, q) -> None:
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError:
            pass
    random.seed()  # forked workers must not share the parent's random state

    async def main() -> tuple[_Worker, float]:
        loop = asyncio.get_running_loop()
        w = _Worker(target.request_bytes(), think_s, float("inf"))
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        t_start = time.monotonic()
        w.deadline = t_start + duration_s
        protos = []
        for _ in range(conns):
            try:
                _, p = await loop.create_connection(lambda: _Conn(w), target.connect_host, target.connect_port)
                protos.append(p)
            except OSError:
                w.errors += 1
        await asyncio.sleep(max(0.0, w.deadline - time.monotonic()))
        elapsed = time.monotonic() - t_start
        for p in protos:
            if p.transport is not None:
                p.transport.close()
        return w, elapsed

    w, elapsed = asyncio.run(main())
    q.put((w.latencies.tobytes(), w.non2xx, w.errors, elapsed))


def run_python(
    target: Target,
    connections: int,
    duration_s: float,
    think_ms: float = 0,
    procs: int = 2,
    cpus: list[int] | None = None,
) -> LoadResult:
    procs = max(1, min(procs, connections))
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    start_at = time.monotonic() + 0.5
    per = [connections // procs + (1 if i < connections % procs else 0) for i in range(procs)]
    workers = [
        ctx.Process(target=_worker_main, args=(target, n, think_ms / 1000, start_at, duration_s, cpus, q), daemon=True)
        for n in per
    ]
    for p in workers:
        p.start()
    lat = array("q")
    non2xx = errors = 0
    elapsed = 0.0
    for _ in workers:
        raw, n, e, el = q.get(timeout=duration_s + 60)
        part = array("q")
        part.frombytes(raw)
        lat.extend(part)
        non2xx += n
        errors += e
        elapsed = max(elapsed, el)
    for p in workers:
        p.join(10)
    vals = sorted(lat)

    def pct(p: float) -> float:
        if not vals:
            return float("nan")
        return vals[min(len(vals) - 1, round(p / 100 * (len(vals) - 1)))] / 1e6

    return LoadResult(
        generator="python",
        connections=connections,
        think_ms=think_ms,
        duration_s=elapsed,
        requests=len(vals),
        non2xx=non2xx,
        errors=errors,
        p50_ms=pct(50),
        p90_ms=pct(90),
        p99_ms=pct(99),
        mean_ms=(sum(vals) / len(vals) / 1e6) if vals else float("nan"),
        max_ms=(vals[-1] / 1e6) if vals else float("nan"),
        extra={"procs": procs},
    )


def run_load(
    generator: str,
    target: Target,
    connections: int,
    duration_s: float,
    think_ms: float = 0,
    cpus: list[int] | None = None,
    py_procs: int = 2,
) -> LoadResult:
    if generator == "wrk":
        return run_wrk(target, connections, duration_s, think_ms, threads=1 if cpus and len(cpus) == 1 else 2, cpus=cpus)
    return run_python(target, connections, duration_s, think_ms, procs=py_procs, cpus=cpus)
