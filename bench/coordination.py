"""Added CPU per request of the coordination stages (claims, Idempotency-Key, workflow steps, rate
limits), on SQLite and PostgreSQL (and rate limits with their counters in Redis).

One upstream (bench/upstream.py) and one `proctor run` per store backend, both
forward proxies on loopback with the same connector, policies and token. Four
scenarios are driven through each, by one agent over a few keep-alive
connections (closed loop, no think time):

- `patch-plain`:   PATCH /plain/1    a route without `claim:` (the baseline for claims);
- `patch-claimed`: PATCH /claimed/1  a claim-bearing route, always the same resource,
                   so after the first write every request is the holder's renewal
                   (`claims` reads the live claims, `claim-acquire` renews in one transaction);
- `post-plain`:    POST /orders/1    no Idempotency-Key (the baseline for keys);
- `post-idem`:     POST /orders/1    a distinct Idempotency-Key on every request: the
                   lookup, the insert-if-absent reservation and the completion that stores
                   the 2xx response (reserve + complete);
- `patch-step`:    PATCH /step/1     a workflow step (instance found, step recorded);
- `patch-limited`: PATCH /limited/1  a route with a `rate_limit` (per agent, far above the
                   load: nothing is throttled): one GCRA decision per request in the
                   counters, plus the RateLimit fields and context.usage;
- `patch-budgeted`: PATCH /budgeted/1 a route in a daily budget (static cost, far above the
                   load): per request one ledger read (context.budget), one reservation and
                   one settle.

With `--redis URL` (default the local server; '' skips it) a third proxy keeps its
state in SQLite and its rate-limit counters in Redis (`counters.backend: redis`); it
runs only the two PATCH scenarios that compare rate limits with their baseline.

The proxy's CPU per request is utime+stime of the `proctor run` process from
/proc (all its threads, so aiosqlite's worker thread is included; as bench/run.py
measures it) over the requests answered, so what the load generator and the
upstream cost is left out. PostgreSQL's own CPU is *not* in that figure (another
process); it is reported beside it: the CPU of the local PostgreSQL backends
serving loopback TCP clients over the same phase (every such client's, so it is
an upper bound on a shared server).

Scenarios and backends are interleaved repeat by repeat (plain, claimed, plain,
keyed, for SQLite then PostgreSQL, then again), and the report gives medians
(and min-max) over repeats, so drift in a shared machine hits all alike.

    .venv/bin/python bench/coordination.py [--requests 3000] [--repeats 3] \\
        [--pg postgresql://postgres@127.0.0.1:5432/test] [--redis redis://127.0.0.1:6379/0] [--json out.json]
    .venv/bin/python bench/coordination.py --render out.json   # the markdown table again

PostgreSQL runs in a fresh schema (`?schema=bench_coord_<random>`) dropped at the
end; `--pg ''` skips it. Nothing here rewrites docs: the numbers are copied into
docs/performance.md ("## Coordination cost") by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import proctor_env  # noqa: E402
from run import free_port, port_open, proc_cpu_seconds, wait_for  # noqa: E402

SCENARIOS = ("patch-plain", "patch-claimed", "post-plain", "post-idem", "patch-step", "patch-limited",
             "patch-budgeted")
# the proxy whose rate-limit counters and budget ledgers are in Redis (state in SQLite) runs only these
REDIS_SCENARIOS = ("patch-plain", "patch-limited", "patch-budgeted")


def scenarios_for(backend: str) -> tuple[str, ...]:
    return REDIS_SCENARIOS if backend == "redis" else SCENARIOS

SCHEMA = """
type Time = { now: datetime, epoch: Long, hour: Long, weekday: Long };
type Headers = { "content-type"?: String, "user-agent"?: String, "idempotency-key"?: String };
entity AgentGroup;
entity Agent in [AgentGroup] { team?: String, level?: Long };
"""

POLICIES = """
@id("coord-bench-anyone")
permit (principal, action in [Action::"coord.plain.update", Action::"coord.claimed.update",
                              Action::"coord.order.create", Action::"coord.step.update",
                              Action::"coord.limited.update", Action::"coord.budgeted.update"], resource);
"""


def connector(upstream_port: int) -> dict:
    return {
        "name": "coord",
        "description": "coordination benchmark upstream (bench/upstream.py)",
        "hosts": [f"127.0.0.1:{upstream_port}"],
        "routes": [
            {"method": "PATCH", "path": "/plain/{id}", "action": "coord.plain.update",
             "resource": {"type": "Item", "id": "{id}"}},
            {"method": "PATCH", "path": "/claimed/{id}", "action": "coord.claimed.update",
             "resource": {"type": "Item", "id": "{id}"},
             "claim": {"mode": "exclusive", "ttl_seconds": 900, "acquire": "implicit"}},
            {"method": "POST", "path": "/orders/{id}", "action": "coord.order.create",
             "resource": {"type": "Order", "id": "{id}"}},
            {"method": "PATCH", "path": "/step/{id}", "action": "coord.step.update",
             "resource": {"type": "Item", "id": "{id}"}},
            # far above any load here: every request is one allowed GCRA decision
            {"method": "PATCH", "path": "/limited/{id}", "action": "coord.limited.update",
             "resource": {"type": "Item", "id": "{id}"},
             "rate_limit": {"name": "bench-per-agent", "key": ["agent"], "limit": 1000000, "period": 1}},
            # a budget far above any load here: every request is one read, one reservation, one settle
            {"method": "PATCH", "path": "/budgeted/{id}", "action": "coord.budgeted.update",
             "resource": {"type": "Item", "id": "{id}"}, "cost": {"static": "0.001"}},
        ],
    }


# A one-step workflow over PATCH /step/{id}: the item names its instance, so after the
# first call every call finds the instance (one store read for context.workflow) and
# records the step again (one write transaction: event, tally, links).
WORKFLOW = {
    "name": "bench",
    "steps": [{"name": "touch", "actions": ["coord.step.update"],
               "objects": [{"type": "Item", "from": "param", "name": "id"}]}],
}


# Per agent, per day, far above any load: never refuses (the ledger's rows grow by one per request).
BUDGET = {"name": "bench-daily", "match": {"actions": ["coord.budgeted.update"]}, "key": ["agent"],
          "limit": "1000000000", "period": "day", "currency": "EUR"}


def build(base: Path, upstream_port: int, stores: dict[str, str | None],
          redis: tuple[str, str] | None = None) -> tuple[dict[str, tuple[Path, int, int]], str]:
    """A deployment in `base`: key, JWKS, connector, policies (ours + the bundled conflict rule),
    and one config per store backend with its own ports and state directory."""
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": proctor_env.KID, "use": "sig", "alg": "ES256"})
    (base / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    (base / "connectors").mkdir()
    (base / "connectors" / "coord.yaml").write_text(yaml.safe_dump(connector(upstream_port), sort_keys=False))
    (base / "policies").mkdir()
    (base / "policies" / "coord.cedar").write_text(POLICIES)
    # The loader appends the schema generated from the manifests (resource types, actions,
    # contexts including `claim`); the shared types and principals are declared here.
    (base / "policies" / "schema.cedarschema").write_text(SCHEMA)
    (base / "policies" / "coordination.cedar").write_text((ROOT / "policies" / "coordination.cedar").read_text())
    (base / "policies" / "workflows.cedar").write_text((ROOT / "policies" / "workflows.cedar").read_text())
    (base / "workflows").mkdir()
    (base / "workflows" / "bench.yaml").write_text(yaml.safe_dump(WORKFLOW, sort_keys=False))
    out = {}
    for name, url in stores.items():
        port, cport = free_port(), free_port()
        cfg = proctor_env._config(f"state-{name}", port, cport)
        if url:
            cfg["store"] = {"url": url}
        cfg["workflows_dir"] = str(base / "workflows")
        cfg["budgets"] = [BUDGET]
        path = base / f"proctor-{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        out[name] = (path, port, cport)
    if redis is not None:  # state in SQLite, rate-limit counters in Redis
        port, cport = free_port(), free_port()
        cfg = proctor_env._config("state-redis", port, cport)
        cfg["workflows_dir"] = str(base / "workflows")
        cfg["budgets"] = [BUDGET]
        cfg["counters"] = {"backend": "redis", "redis_url": redis[0], "prefix": redis[1]}
        path = base / "proctor-redis.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        out["redis"] = (path, port, cport)
    return out, proctor_env.make_token(key)


# ---------------------------------------------------------------- load generator
class _Client(asyncio.Protocol):
    """One keep-alive connection: send, read the whole answer, send the next (closed loop)."""

    def __init__(self, make, run) -> None:
        self.make, self.run = make, run
        self.buf = b""
        self.done = asyncio.get_running_loop().create_future()
        self.t0 = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.send()

    def send(self) -> None:
        req = self.run.next_request(self.make)
        if req is None:
            self.transport.close()
            return
        self.t0 = time.perf_counter_ns()
        self.transport.write(req)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].lower()
            length = 0
            if (i := head.find(b"\r\ncontent-length:")) >= 0:
                j = head.find(b"\r\n", i + 2)
                length = int(head[i + 17 : j if j >= 0 else len(head)].strip())
            if len(self.buf) < end + 4 + length:
                return
            self.run.record(int(head[9:12]), time.perf_counter_ns() - self.t0)
            self.buf = self.buf[end + 4 + length :]
            self.send()

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_result(None)


class _Run:
    def __init__(self, total: int) -> None:
        self.left = total
        self.statuses: dict[int, int] = {}
        self.lat: list[int] = []

    def next_request(self, make) -> bytes | None:
        if self.left <= 0:
            return None
        self.left -= 1
        return make()

    def record(self, status: int, ns: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.lat.append(ns)


def request_maker(scenario: str, upstream_port: int, token: str):
    method, path = {"patch-plain": ("PATCH", "/plain/1"), "patch-claimed": ("PATCH", "/claimed/1"),
                    "post-plain": ("POST", "/orders/1"), "post-idem": ("POST", "/orders/1"),
                    "patch-step": ("PATCH", "/step/1"), "patch-limited": ("PATCH", "/limited/1"),
                    "patch-budgeted": ("PATCH", "/budgeted/1")}[scenario]
    head = (f"{method} http://127.0.0.1:{upstream_port}{path} HTTP/1.1\r\nHost: 127.0.0.1:{upstream_port}\r\n"
            f"Proxy-Authorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n")
    fixed = (head + "\r\n{}").encode()
    if scenario != "post-idem":
        return lambda: fixed
    prefix = uuid.uuid4().hex
    counter = iter(range(10**12))
    return lambda: (head + f"Idempotency-Key: {prefix}-{next(counter)}\r\n\r\n{{}}").encode()


async def drive(port: int, make, total: int, connections: int) -> tuple[_Run, float]:
    loop = asyncio.get_running_loop()
    run = _Run(total)
    t0 = time.perf_counter()
    clients = [(await loop.create_connection(lambda: _Client(make, run), "127.0.0.1", port))[1]
               for _ in range(connections)]
    await asyncio.wait_for(asyncio.gather(*(c.done for c in clients)), timeout=300)
    return run, time.perf_counter() - t0


# ------------------------------------------------------------------ postgres CPU
def pg_backend_cpu() -> float | None:
    """CPU seconds of every local PostgreSQL backend serving a TCP client on 127.0.0.1.

    asyncpg's backends show as `postgres: <user> <db> 127.0.0.1(<port>) ...`. This counts
    all of them, not only this Proctor's (other clients of the same server add to it), so
    it is only meaningful as a delta over one phase and reads high on a shared machine;
    None when no such backend is visible (a remote server)."""
    total, found = 0.0, False
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            if not cmd.startswith(b"postgres: ") or b"127.0.0.1(" not in cmd:
                continue
            total += proc_cpu_seconds(int(d.name))
            found = True
        except (OSError, ValueError, IndexError):
            continue
    return total if found else None


@dataclass
class Sample:
    backend: str
    scenario: str
    repeat: int
    requests: int
    statuses: dict
    seconds: float
    cpu_us_per_req: float
    pg_us_per_req: float | None
    p50_ms: float


def measure(backend: str, scenario: str, repeat: int, pid: int, port: int, upstream_port: int, token: str,
            total: int, connections: int) -> Sample:
    make = request_maker(scenario, upstream_port, token)
    pg0 = pg_backend_cpu() if backend == "postgresql" else None
    c0 = proc_cpu_seconds(pid)
    run, secs = asyncio.run(drive(port, make, total, connections))
    c1 = proc_cpu_seconds(pid)
    pg1 = pg_backend_cpu() if backend == "postgresql" else None
    n = len(run.lat)
    lat = sorted(run.lat)
    return Sample(backend, scenario, repeat, n, run.statuses, round(secs, 3),
                  round((c1 - c0) / n * 1e6, 1),
                  round((pg1 - pg0) / n * 1e6, 1) if pg0 is not None and pg1 is not None else None,
                  round(lat[len(lat) // 2] / 1e6, 3))


def summarize(samples: list[Sample]) -> list[dict]:
    rows = []
    backends = sorted({s.backend for s in samples}, key=lambda b: (b != "sqlite", b == "redis"))
    for b in backends:
        med = {}
        for sc in scenarios_for(b):
            ss = [s for s in samples if s.backend == b and s.scenario == sc]
            cpu = [s.cpu_us_per_req for s in ss]
            pg = [s.pg_us_per_req for s in ss if s.pg_us_per_req is not None]
            med[sc] = statistics.median(cpu)
            rows.append({"backend": b, "scenario": sc, "repeats": len(ss),
                         "cpu_us_median": round(statistics.median(cpu), 1),
                         "cpu_us_min": min(cpu), "cpu_us_max": max(cpu),
                         "pg_backend_us_median": round(statistics.median(pg), 1) if pg else None,
                         "rps_median": round(statistics.median(s.requests / s.seconds for s in ss)),
                         "p50_ms_median": round(statistics.median(s.p50_ms for s in ss), 3),
                         "non2xx": sum(n for s in ss for st, n in s.statuses.items() if not 200 <= st < 300)})
        # added CPU: per repeat (same repeat's baseline), then the median of those differences
        for sc, base in (("patch-claimed", "patch-plain"), ("post-idem", "post-plain"), ("patch-step", "patch-plain"),
                         ("patch-limited", "patch-plain"), ("patch-budgeted", "patch-plain")):
            if sc not in scenarios_for(b):
                continue
            diffs = []
            for r in sorted({s.repeat for s in samples}):
                x = [s for s in samples if s.backend == b and s.scenario == sc and s.repeat == r]
                y = [s for s in samples if s.backend == b and s.scenario == base and s.repeat == r]
                if x and y:
                    diffs.append(x[0].cpu_us_per_req - y[0].cpu_us_per_req)
            row = next(rw for rw in rows if rw["backend"] == b and rw["scenario"] == sc)
            row["added_us_median"] = round(statistics.median(diffs), 1)
            row["added_us_range"] = [round(min(diffs), 1), round(max(diffs), 1)]
    return rows


def _one(port: int, raw: bytes) -> tuple[int, bytes]:
    """One request on a fresh connection: (status, lower-cased header block)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(raw)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = c.recv(65536)
            if not chunk:
                break
            buf += chunk
    head = buf.split(b"\r\n\r\n", 1)[0].lower()
    return int(head[9:12]), head


def preflight(name: str, port: int, upstream_port: int, token: str) -> None:
    """Prove each scenario takes the path it is meant to measure, before measuring it."""
    st, head = _one(port, request_maker("patch-limited", upstream_port, token)())
    assert st == 200 and b'\r\nratelimit-policy: "bench-per-agent";q=1000000;w=1' in head, (name, st, head)
    st, head = _one(port, request_maker("patch-plain", upstream_port, token)())
    assert st == 200 and b"ratelimit" not in head, (name, st, head)
    st, head = _one(port, request_maker("patch-budgeted", upstream_port, token)())
    assert st == 200, (name, st, head)
    if name == "redis":
        print(f"preflight {name}: RateLimit fields on the limited route only: ok", flush=True)
        return
    st, head = _one(port, request_maker("patch-claimed", upstream_port, token)())
    assert st == 200 and b"\r\nproctor-claim: clm_" in head, (name, st, head)
    st, head = _one(port, request_maker("patch-plain", upstream_port, token)())
    assert st == 200 and b"proctor-claim" not in head, (name, st, head)
    idem = request_maker("post-idem", upstream_port, token)()
    st, head = _one(port, idem)
    assert st == 200 and b"idempotent-replayed" not in head, (name, st, head)
    st, head = _one(port, idem)  # the same key again: replayed from the store, not forwarded
    assert st == 200 and b"\r\nidempotent-replayed: true" in head, (name, st, head)
    st, head = _one(port, request_maker("patch-step", upstream_port, token)())
    assert st == 200 and b"\r\nproctor-workflow: bench; instance=wfi_" in head, (name, st, head)
    print(f"preflight {name}: claim header on the claimed route, replay of a repeated key, workflow header: ok",
          flush=True)


LABELS = {"patch-plain": "PATCH, route without `claim:`", "patch-claimed": "PATCH, claimed route (holder renews)",
          "post-plain": "POST without Idempotency-Key", "post-idem": "POST, distinct Idempotency-Key each",
          "patch-step": "PATCH, a workflow step (instance found, step recorded)",
          "patch-limited": "PATCH, a rate-limited route (one GCRA decision)",
          "patch-budgeted": "PATCH, a budgeted route (read, reserve, settle)"}


def render_table(rows: list[dict]) -> str:
    """The markdown table for docs/performance.md ("## Coordination cost") from `summarize`'s rows."""
    out = ["| store (rate-limit counters) | request | proxy CPU/request, µs: median (min–max) | added over its baseline, µs: median of per-repeat differences (range) "
           "| PostgreSQL backends' CPU/request, µs | req/s (4 connections) | p50 ms |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        added = (f"**+{r['added_us_median']:,.0f}** (+{r['added_us_range'][0]:,.0f} … +{r['added_us_range'][1]:,.0f})"
                 if "added_us_median" in r else "baseline")
        pg = "–" if r["pg_backend_us_median"] is None else f"{r['pg_backend_us_median']:,.0f}"
        where = "sqlite (redis)" if r["backend"] == "redis" else r["backend"]
        out.append(f"| {where} | {LABELS[r['scenario']]} | {r['cpu_us_median']:,.0f} ({r['cpu_us_min']:,.0f}–"
                   f"{r['cpu_us_max']:,.0f}) | {added} | {pg} | {r['rps_median']:,} | {r['p50_ms_median']:.2f} |")
    return "\n".join(out) + "\n"


def drop_schema(dsn: str, schema: str) -> None:
    import asyncpg

    async def go() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(go())


def drop_redis_keys(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000, help="requests per scenario and repeat")
    ap.add_argument("--warmup", type=int, default=300, help="requests per scenario before the first repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test",
                    help="PostgreSQL DSN ('' to skip PostgreSQL)")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0",
                    help="Redis URL for the rate-limit counters of a third proxy ('' to skip it)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument("--render", type=Path, metavar="JSON", help="only print the markdown table of a saved --json run")
    a = ap.parse_args(argv)
    if a.render:
        print(render_table(json.loads(a.render.read_text())["summary"]), end="")
        return 0

    base = Path(tempfile.mkdtemp(prefix="proctor-coord-"))
    schema = "bench_coord_" + uuid.uuid4().hex[:10]
    stores: dict[str, str | None] = {"sqlite": None}
    if a.pg:
        stores["postgresql"] = f"{a.pg}{'&' if '?' in a.pg else '?'}schema={schema}"
    up_port = free_port()
    redis_prefix = f"bench-coord-{uuid.uuid4().hex[:10]}:"
    configs, token = build(base, up_port, stores, (a.redis, redis_prefix) if a.redis else None)
    procs: list[subprocess.Popen] = []
    py = sys.executable
    try:
        procs.append(subprocess.Popen([py, str(BENCH / "upstream.py"), "--port", str(up_port)],
                                      stdout=open(base / "upstream.log", "w"), stderr=subprocess.STDOUT))
        wait_for(lambda: port_open(up_port), 10, "upstream")
        pids = {}
        for name, (cfg, port, cport) in configs.items():
            p = subprocess.Popen([py, "-m", "proxy.cli", "run", "-c", str(cfg), "--log-level", "warning"],
                                 stdout=open(base / f"proctor-{name}.log", "w"), stderr=subprocess.STDOUT,
                                 cwd=str(base), env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT)))
            procs.append(p)

            def ready(cport=cport) -> bool:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{cport}/readyz", timeout=1) as r:
                        return r.status == 200
                except Exception:  # noqa: BLE001
                    return False

            wait_for(ready, 60, f"proctor ({name}) readiness", proc=p, log=base / f"proctor-{name}.log")
            pids[name] = (p.pid, port)
        for name, (_pid, port) in pids.items():
            preflight(name, port, up_port, token)
        for name, (pid, port) in pids.items():  # warm-up; also takes the claim, so later writes renew it
            for sc in scenarios_for(name):
                w = measure(name, sc, 0, pid, port, up_port, token, a.warmup, a.connections)
                print(f"warmup {name:10} {sc:14} statuses={w.statuses}", flush=True)
        samples: list[Sample] = []
        for r in range(1, a.repeats + 1):
            for name, (pid, port) in pids.items():
                for sc in scenarios_for(name):
                    s = measure(name, sc, r, pid, port, up_port, token, a.requests, a.connections)
                    samples.append(s)
                    print(f"repeat {r} {name:10} {sc:14} {s.cpu_us_per_req:8.1f} µs CPU/req  "
                          f"pg={s.pg_us_per_req}  {s.requests / s.seconds:6.0f} req/s  p50={s.p50_ms} ms  "
                          f"statuses={s.statuses}", flush=True)
        rows = summarize(samples)
        print(render_table(rows))
        if a.json:
            a.json.write_text(json.dumps({"args": vars(a) | {"json": str(a.json)}, "summary": rows,
                                          "samples": [asdict(s) for s in samples],
                                          "loadavg": Path("/proc/loadavg").read_text().split()[:3],
                                          "cpus": os.cpu_count()}, indent=1))
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if a.pg:
            try:
                drop_schema(a.pg, schema)
            except Exception as e:  # noqa: BLE001
                print(f"could not drop schema {schema}: {e}", file=sys.stderr)
        if a.redis:
            try:
                drop_redis_keys(a.redis, redis_prefix)
            except Exception as e:  # noqa: BLE001
                print(f"could not delete the Redis keys {redis_prefix}*: {e}", file=sys.stderr)
        if not a.keep_tmp:
            import shutil

            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
