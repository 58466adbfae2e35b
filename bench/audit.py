"""Audit trail and tracing cost: a benchmark (not a test).

Part A, in-process: audit throughput to the file sink.
  Realistic decision records (allowed reads, policy denials, holds, refused
  unauthenticated requests; most with their Cedar inputs, as
  `record.policy_inputs` keeps them by default) are pushed through
  `AuditTrail.emit` with the real `FileSink` (default rotation at 100 MiB, no
  fsync) and the default redaction, in a temporary directory. Reported:
  events/s, µs/event, bytes/event, and the cost split over the four stages
  (`to_ocsf`, redaction, `Chain.link`, the `write(2)`), each timed on its own
  over the same records. A short `fsync: true` run shows what durability
  costs. The chain written is checked with `proxy.audit.chain.verify`.

Part B, end to end: the request-path cost of the audit trail and of tracing.
  Four real Proctor processes (`proctor run`, the deployment of bench/run.py:
  500 generated Cedar policies, ES256 JWT issuer, `bench` connector, one
  upstream) differing only in
      audit on (the default: file sink, fail_closed, redaction) / `audit: {enabled: false}`
    x tracing off / on (OTEL_TRACES_EXPORTER=otlp, http/protobuf, to a tiny local
      OTLP/HTTP sink on loopback that answers 200 to every export, so the
      exporter does real work and is never stuck on a dead endpoint).
  The decision record (decisions.jsonl) is written in all four. Each is driven
  with the same load as bench/run.py (bench/loadgen.py: wrk if installed, else
  the Python generator): a closed-loop throughput phase (64 connections) and a
  moderate-load latency phase (4 connections with a random think time). Every
  phase is bounded (default 6 s, at most 15 s), and the four configurations are
  measured in ABCD, DCBA, ABCD order (`--repeats 3`; medians reported) so slow
  drift in the machine's speed hits them alike. The proxy's CPU per request is read from
  /proc, and the CPU used by other processes on the machine during each phase
  is reported, since a shared machine distorts the numbers.

Only loopback addresses are used; every process started is stopped at the end.

    .venv/bin/python bench/audit.py                 # both parts, ~5 minutes
    .venv/bin/python bench/audit.py --part a --events 200000
    .venv/bin/python bench/audit.py --part b --duration 6 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import loadgen  # noqa: E402
import proctor_env  # noqa: E402
import run as benchrun  # noqa: E402  (process, port and CPU helpers of bench/run.py)
import yaml  # noqa: E402

from proxy.audit.chain import Chain, verify  # noqa: E402
from proxy.audit.keys import read_key_file  # noqa: E402
from proxy.audit.ocsf import to_ocsf  # noqa: E402
from proxy.record.model import parse_record  # noqa: E402
from proxy.audit.trail import AuditTrail, FileSink, Redactor  # noqa: E402
from proxy.config import DEFAULT_REDACT_KEYS, DEFAULT_REDACT_PATTERNS, AuditFileConfig  # noqa: E402

PY = sys.executable
MAX_PHASE_S = 15.0


# =================================================================== part A
def _decision_id(i: int, t_ms: int) -> str:
    return f"{t_ms:012x}-{random.getrandbits(80):020x}"


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def make_records(n: int, seed: int = 7) -> list[dict]:
    """`n` distinct, realistic decision-record lines (the shape of proxy.record.decisions.decision_record).

    Mix: 70% allowed reads (GET, 200), 15% policy denials of writes (POST, 403),
    5% holds (POST, 202 async), 5% allowed writes (PATCH, 200), 5% refused
    without a token (407, no Cedar inputs).
    """
    rnd = random.Random(seed)
    random.seed(seed)
    now = int(time.time() * 1000)
    out = []
    for i in range(n):
        t = now + i
        kind = rnd.random()
        agent = rnd.choice(["procurement-bot", "support-bot", "sales-assistant", "finance-agent"])
        po = str(4500000000 + rnd.randrange(100000))
        base = {
            "decision_id": _decision_id(i, t), "time": _iso(t),
            "agent": agent, "issuer": "https://idp.example.com",
            "connector": "erp", "policy_revision": "c0655da3658c7357",
            "latency_ms": round(rnd.uniform(1.5, 40.0), 3), "decision_ms": round(rnd.uniform(0.3, 3.0), 3),
            "host": "erp.internal.example.com", "port": 443, "mode": "forward",
            "client_ip": f"10.20.{rnd.randrange(256)}.{rnd.randrange(1, 255)}",
        }
        cedar = {
            "principal": {"uid": {"type": "Agent", "id": agent}, "attrs": {"team": "purchasing", "level": 2},
                          "parents": [{"type": "AgentGroup", "id": "procurement"},
                                      {"type": "AgentGroup", "id": "erp-readers"}]},
            "resource": {"uid": {"type": "PurchaseOrder", "id": po},
                         "attrs": {"supplier": str(17300000 + rnd.randrange(1000)), "currency": "EUR",
                                   "net_amount": {"__extn": {"fn": "decimal", "arg": f"{rnd.uniform(10, 90000):.2f}"}},
                                   "release_status": "NOT_RELEASED",
                                   "created_by": {"__entity": {"type": "Agent", "id": agent}}},
                         "parents": []},
            "context": {"method": "GET", "path": f"/sap/opu/odata/sap/API_PURCHASEORDER_PROCESS_SRV/A_PurchaseOrder('{po}')",
                        "host": "erp.internal.example.com", "port": 443,
                        "headers": {"user-agent": "python-requests/2.32.3"}, "connector": "erp", "risk": "low",
                        "time": {"now": {"__extn": {"fn": "datetime", "arg": _iso(t)[:19] + "Z"}},
                                 "epoch": t // 1000, "hour": 7, "weekday": 6},
                        "source_ip": {"__extn": {"fn": "ip", "arg": base["client_ip"]}}, "mode": "forward",
                        "params": {"po": po}},
        }
        if kind < 0.70:
            rec = base | {"action": "erp.purchase_order.read", "resource": f'PurchaseOrder::"{po}"', "risk": "low",
                          "decision": "allow", "reasons": ["erp-readers-read-orders"], "status": 200,
                          "upstream_status": 200, "method": "GET", "path": cedar["context"]["path"],
                          "policy_decision": "allow", "cedar": cedar}
        elif kind < 0.85:
            c = copy.deepcopy(cedar)
            c["context"].update(method="POST", path=c["context"]["path"] + "/Release", risk="critical")
            rec = base | {"action": "erp.purchase_order.release", "resource": f'PurchaseOrder::"{po}"',
                          "risk": "critical", "decision": "deny", "reasons": ["two-person-release"], "status": 403,
                          "upstream_status": None, "method": "POST", "path": c["context"]["path"],
                          "policy_decision": "deny", "cedar": c,
                          "refusal": {"kind": "policy", "title": "Denied by policy",
                                      "detail": f"{agent} may not erp.purchase_order.release on PurchaseOrder::\"{po}\": "
                                                "forbidden by policy two-person-release"}}
        elif kind < 0.90:
            c = copy.deepcopy(cedar)
            c["context"].update(method="POST", path="/sap/opu/odata/sap/API_PURCHASEORDER_PROCESS_SRV/A_PurchaseOrder",
                                risk="high", fields={"net_amount": 26000, "currency": "EUR"})
            rec = base | {"action": "erp.purchase_order.create", "resource": 'PurchaseOrder::"new"', "risk": "high",
                          "decision": "hold", "reasons": ["po-over-10k-needs-manager"], "status": 202,
                          "upstream_status": None, "method": "POST", "path": c["context"]["path"],
                          "policy_decision": "hold", "cedar": c, "approval_id": f"apr_{random.getrandbits(96):024x}",
                          "refusal": {"kind": "approval-pending", "title": "Held for approval",
                                      "detail": "this request needs approval by procurement-managers; retry the same "
                                                "request (or poll the status URL) after 5 s: once approved, the retry goes through"}}
        elif kind < 0.95:
            c = copy.deepcopy(cedar)
            c["context"].update(method="PATCH", risk="medium", fields={"delivery_date": "2027-01-15"})
            rec = base | {"action": "erp.purchase_order.update", "resource": f'PurchaseOrder::"{po}"', "risk": "medium",
                          "decision": "allow", "reasons": ["procurement-updates-own-orders"], "status": 200,
                          "upstream_status": 200, "method": "PATCH", "path": c["context"]["path"],
                          "policy_decision": "allow", "cedar": c}
        else:
            rec = base | {"agent": None, "issuer": None, "action": None, "resource": None, "connector": None,
                          "risk": None, "decision": "deny", "reasons": [], "policy_revision": None, "status": 407,
                          "upstream_status": None, "decision_ms": round(rnd.uniform(0.05, 0.2), 3), "method": "GET",
                          "path": "/sap/opu/odata/sap/API_PURCHASEORDER_PROCESS_SRV/A_PurchaseOrder",
                          "refusal": {"kind": "authentication", "title": "Proxy authentication required",
                                      "detail": "no credential: send Proxy-Authorization: Bearer <token>"}}
        out.append(rec)
    return out


def _ns_per(fn_total_ns: int, n: int) -> float:
    return fn_total_ns / n / 1000 if n else float("nan")


def part_a(args: argparse.Namespace, tmp: Path) -> dict:
    # typed, as the decision recorder hands records to the trail (validated here, outside the timing)
    pool = [parse_record(r) for r in make_records(args.pool)]
    redactor = Redactor(DEFAULT_REDACT_KEYS, DEFAULT_REDACT_PATTERNS)
    fcfg = AuditFileConfig()
    res: dict = {"pool": args.pool, "requested_events": args.events, "file_max_bytes": fcfg.max_bytes}

    # -- end to end: AuditTrail.emit -> FileSink (defaults), bounded in time
    d = tmp / "emit"
    sink = FileSink(d / "audit.jsonl", fcfg.max_bytes, fcfg.max_age_seconds, fcfg.keep, False, fcfg.overflow)
    trail = AuditTrail([sink], redactor, Chain(), frozenset({"POST", "PUT", "PATCH", "DELETE"}), 5.0)
    for r in pool[:2000]:  # warm-up (not counted; its events are in the file and verified too)
        trail.emit(r)
    gc.collect()
    deadline = time.perf_counter() + args.max_seconds
    n = 0
    cpu0, t0 = time.process_time(), time.perf_counter_ns()
    npool = len(pool)
    while n < args.events:
        for i in range(n, min(n + 1000, args.events)):
            trail.emit(pool[i % npool])
        n = min(n + 1000, args.events)
        if time.perf_counter() > deadline:
            break
    wall_ns = time.perf_counter_ns() - t0
    cpu = time.process_time() - cpu0
    files = sink.rotated_files() + [sink.path]
    size = sum(f.stat().st_size for f in files)
    total_events = n + 2000
    asyncio_close(sink)
    t_v = time.perf_counter()
    rep = verify(files)
    res["emit"] = {
        "events": n, "wall_s": wall_ns / 1e9, "events_per_s": n / (wall_ns / 1e9), "us_per_event": _ns_per(wall_ns, n),
        "cpu_us_per_event": cpu / n * 1e6, "bytes_per_event": size / total_events, "files": len(files),
        "rotations": len(files) - 1, "errors": trail.errors, "sink_stats": dict(sink.stats),
        "bounded_by_time": n < args.events,
        "verify": {"ok": rep.ok, "events": rep.events, "seconds": time.perf_counter() - t_v,
                   "problems": [str(p) for p in rep.problems[:5]]},
    }
    shutil.rmtree(d, ignore_errors=True)

    # -- the same work stage by stage, over the same records (batches of 200, so that GC sees what emit sees)
    m = min(args.split_events, max(n, 5000))
    d = tmp / "split"
    d.mkdir()
    fd = os.open(d / "audit.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    chain = Chain()
    wall = {"to_ocsf": 0, "redact": 0, "chain_link": 0, "write": 0}
    cpu = dict(wall)
    done = 0
    gc.collect()

    def stage(name, fn):
        w0, c0 = time.perf_counter_ns(), time.process_time_ns()
        out = fn()
        wall[name] += time.perf_counter_ns() - w0
        cpu[name] += time.process_time_ns() - c0
        return out

    while done < m:
        batch = [pool[(done + j) % npool] for j in range(min(200, m - done))]
        # each lambda runs at once, inside stage(); the defaults bind this iteration's values
        evs = stage("to_ocsf", lambda batch=batch: [to_ocsf(r) for r in batch])
        evs = stage("redact", lambda evs=evs: [redactor(e) for e in evs])
        lines = stage("chain_link", lambda evs=evs: [chain.link(e) for e in evs])
        stage("write", lambda lines=lines: [os.write(fd, line) for line in lines])
        done += len(batch)
        del evs, lines
    os.close(fd)
    shutil.rmtree(d, ignore_errors=True)
    res["split"] = {"events": m}
    for k in wall:
        res["split"][f"{k}_us"] = _ns_per(wall[k], m)
        res["split"][f"{k}_cpu_us"] = _ns_per(cpu[k], m)
    res["split"]["sum_us"] = _ns_per(sum(wall.values()), m)
    res["split"]["sum_cpu_us"] = _ns_per(sum(cpu.values()), m)
    # what the pattern costs: the same redaction with the keys only
    keys_only = Redactor(DEFAULT_REDACT_KEYS, [])
    evs = [to_ocsf(r) for r in pool]
    c0 = time.process_time_ns()
    for e in evs:
        keys_only(e)
    res["split"]["redact_keys_only_cpu_us"] = _ns_per(time.process_time_ns() - c0, len(evs))

    # -- fsync: true (bounded: a few seconds)
    d = tmp / "fsync"
    sink = FileSink(d / "audit.jsonl", fcfg.max_bytes, 0, 0, True, fcfg.overflow)
    trail = AuditTrail([sink], redactor, Chain(), frozenset(), 5.0)
    deadline = time.perf_counter() + args.fsync_seconds
    k = 0
    t0 = time.perf_counter_ns()
    while k < args.fsync_events and time.perf_counter() < deadline:
        trail.emit(pool[k % npool])
        k += 1
    wall_ns = time.perf_counter_ns() - t0
    asyncio_close(sink)
    res["fsync"] = {"events": k, "events_per_s": k / (wall_ns / 1e9), "us_per_event": _ns_per(wall_ns, k),
                    "filesystem": _fs_type(d)}
    shutil.rmtree(d, ignore_errors=True)
    return res


def asyncio_close(sink: FileSink) -> None:
    import asyncio

    asyncio.run(sink.close())


def _fs_type(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, check=False).stdout.splitlines()
        return out[-1].split()[1] if len(out) > 1 else "?"
    except OSError:
        return "?"


# =================================================================== part B
OTLP_SINK = r"""
import asyncio, signal, sys
count = {"requests": 0, "bytes": 0}
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n"
class P(asyncio.Protocol):
    def connection_made(self, t): self.t, self.buf = t, b""
    def data_received(self, data):
        buf = self.buf + data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0: break
            head = buf[:end].lower(); i = head.find(b"content-length:"); n = 0
            if i >= 0:
                j = head.find(b"\r\n", i); n = int(head[i + 15: j if j >= 0 else len(head)].strip() or 0)
            if len(buf) < end + 4 + n: break
            count["requests"] += 1; count["bytes"] += n
            buf = buf[end + 4 + n:]
            self.t.write(OK)
        self.buf = buf
async def main():
    loop = asyncio.get_running_loop(); stop = asyncio.Event()
    for s in (signal.SIGINT, signal.SIGTERM): loop.add_signal_handler(s, stop.set)
    srv = await loop.create_server(P, "127.0.0.1", int(sys.argv[1]))
    print("otlp sink listening", flush=True)
    async with srv: await stop.wait()
    print(f"OTLPCOUNT {count['requests']} {count['bytes']}", flush=True)
asyncio.run(main())
"""

CONFIGS = {
    "A": ("audit on, tracing off", True, False),
    "B": ("audit off, tracing off", False, False),
    "C": ("audit on, tracing on", True, True),
    "D": ("audit off, tracing on", False, True),
}


def _spawn(name: str, cmd: list[str], cpus, log: Path, port: int, cwd: Path | None = None, extra_env: dict | None = None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONDEVMODE", None)
    for k in [k for k in env if k.startswith("OTEL_")]:
        env.pop(k)  # only what this benchmark sets
    env.update(extra_env or {})
    with open(log, "w") as out:
        p = subprocess.Popen(benchrun.pinned(cmd, cpus), stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                             start_new_session=True)
    return benchrun.Proc(name, p, log, port)


def part_b(args: argparse.Namespace, tmp: Path) -> dict:
    gen = args.generator
    if gen == "auto":
        gen = "wrk" if loadgen.have_wrk() else "python"
    layout = benchrun.cpu_layout(not args.no_pin)
    duration = min(args.duration, MAX_PHASE_S)
    lat_duration = min(args.latency_duration, MAX_PHASE_S)
    res: dict = {"generator": gen, "layout": layout, "duration_s": duration, "latency_duration_s": lat_duration,
                 "connections": args.connections, "latency_connections": args.latency_connections,
                 "think_ms": args.think_ms, "repeats": args.repeats, "phases": [], "checks": []}
    procs: list[benchrun.Proc] = []
    try:
        up_port, otlp_port = benchrun.free_port(), benchrun.free_port()
        upstream = _spawn("upstream", [PY, str(BENCH / "upstream.py"), "--port", str(up_port)], layout["upstream"],
                          tmp / "upstream.log", up_port)
        procs.append(upstream)
        (tmp / "otlp_sink.py").write_text(OTLP_SINK)
        otlp = _spawn("otlp", [PY, str(tmp / "otlp_sink.py"), str(otlp_port)], layout["client"], tmp / "otlp.log", otlp_port)
        procs.append(otlp)
        envs: dict[str, proctor_env.ProctorEnv] = {}
        proxies: dict[str, benchrun.Proc] = {}
        for key, (_label, audit_on, tracing_on) in CONFIGS.items():
            port, ctl = benchrun.free_port(), benchrun.free_port()
            env = proctor_env.build(tmp / f"proctor-{key}", up_port, port, ctl, args.policies)
            cfg = yaml.safe_load(env.config_path.read_text())
            if not audit_on:
                cfg["audit"] = {"enabled": False}
            env.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            extra = {}
            if tracing_on:
                extra = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
                         "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_SERVICE_NAME": f"proctor-bench-{key}"}
            proxies[key] = _spawn(f"proctor-{key}", [PY, "-m", "proxy.cli", "run", "-c", str(env.config_path),
                                                     "--log-level", "info"],
                                  layout["proxy"], tmp / f"proctor-{key}.log", port, cwd=env.dir, extra_env=extra)
            procs.append(proxies[key])
            envs[key] = env
        benchrun.wait_for(lambda: benchrun.port_open(up_port), 20, "upstream", upstream.popen, upstream.log)
        benchrun.wait_for(lambda: benchrun.port_open(otlp_port), 20, "otlp sink", otlp.popen, otlp.log)
        for key, env in envs.items():
            benchrun.wait_for(
                lambda env=env: _ready(env.control_port), 90, f"proctor {key} readiness", proxies[key].popen, proxies[key].log
            )
        up_hostport = f"127.0.0.1:{up_port}"
        absolute = f"http://{up_hostport}/items/1"
        targets = {k: loadgen.Target("127.0.0.1", e.port, absolute, up_hostport, e.proxy_authorization) for k, e in envs.items()}
        for key, t in targets.items():
            status, headers, body = benchrun.http_get(t.connect_port, t.request_target,
                                                      {"Host": t.host_header, "Proxy-Authorization": t.proxy_authorization})
            if status != 200 or "x-proctor-decision-id" not in headers:
                raise RuntimeError(f"pre-flight {key}: expected 200 with X-Proctor-Decision-Id, got {status}: {body[:300]!r}")
            audit = envs[key].dir / "state" / "audit.jsonl"
            time.sleep(0.1)
            has_audit = audit.exists() and audit.stat().st_size > 0
            if has_audit != CONFIGS[key][1]:
                raise RuntimeError(f"pre-flight {key}: audit file present={has_audit}, expected {CONFIGS[key][1]}")
            res["checks"].append(f"{key} ({CONFIGS[key][0]}): GET -> 200, audit.jsonl {'written' if has_audit else 'absent'}")
        bench_pids = [p.pid for p in procs]
        if args.wait_quiet > 0:
            waited, level = benchrun.wait_quiet(bench_pids, args.wait_quiet, 0.15)
            res["quiet_wait"] = {"waited_s": round(waited, 1), "other_cores": round(level, 2)}
        order = list(CONFIGS)
        schedule = []
        for i in range(args.repeats):
            schedule += [(k, i + 1) for k in (order if i % 2 == 0 else order[::-1])]
        think = args.think_ms
        print(f"part B: generator {gen}, CPU layout {layout}; schedule {' '.join(k for k, _ in schedule)}")
        for kind in ("throughput", "latency"):
            for key, rep in schedule:
                conns = args.connections if kind == "throughput" else args.latency_connections
                th = 0 if kind == "throughput" else think
                loadgen.run_load(gen, targets[key], conns, args.warmup if kind == "throughput" else 1, th,
                                 cpus=layout["client"], py_procs=args.py_procs)
                ph = benchrun.measure(key, kind, gen, targets[key], conns, duration if kind == "throughput" else lat_duration,
                                      th, layout["client"], proxies[key], bench_pids, args.py_procs)
                r = ph.result
                row = {"config": key, "label": CONFIGS[key][0], "kind": kind, "repeat": rep, "rps": r.rps,
                       "p50_ms": r.p50_ms, "p90_ms": r.p90_ms, "p99_ms": r.p99_ms, "requests": r.requests,
                       "non2xx": r.non2xx, "errors": r.errors, "proxy_us_per_req": ph.proxy_us_per_req,
                       "other_cores": ph.other_cores, "steal_s": ph.steal_s, "wall_s": ph.wall_s}
                res["phases"].append(row)
                print(f"  {kind:10s} {key} #{rep} {CONFIGS[key][0]:24s} {r.rps:8,.0f} req/s  p50 {r.p50_ms:7.3f}  "
                      f"p99 {r.p99_ms:7.3f} ms  non-2xx {r.non2xx} errors {r.errors}  proxy CPU/req "
                      f"{benchrun.fmt(ph.proxy_us_per_req, 0)} µs  other processes {ph.other_cores:.2f} cores", flush=True)
        # after the load: every audited request is one chained event; spans reached the sink
        for key, env in envs.items():
            st = benchrun.proctor_stats(env.control_port)
            res.setdefault("stats", {})[key] = st
        for key in envs:
            proxies[key].stop()
        otlp.popen.send_signal(signal.SIGTERM)
        otlp.popen.wait(10)
        count = next((ln.split()[1:] for ln in otlp.log.read_text().splitlines() if ln.startswith("OTLPCOUNT")), None)
        res["otlp_exports"] = {"requests": int(count[0]), "bytes": int(count[1])} if count else None
        for key, env in envs.items():
            if not CONFIGS[key][1]:
                continue
            state = env.dir / "state"
            files = sorted(state.glob("audit-*.jsonl")) + [state / "audit.jsonl"]
            keys = [read_key_file(state / "audit-chain.key")] if (state / "audit-chain.key").exists() else []
            rep = verify([f for f in files if f.exists()], keys)  # the trail is keyed (HMAC-SHA256) by default
            decisions = sum(1 for _ in open(state / "decisions.jsonl", "rb"))
            res["checks"].append(f"{key}: {rep.events:,} audit events for {decisions:,} decision-record lines; "
                                 f"proctor audit verify: {'ok' if rep.ok else 'PROBLEMS ' + '; '.join(map(str, rep.problems[:3]))}")
    finally:
        for p in reversed(procs):
            p.stop()
    return res


def _ready(port: int) -> bool:
    try:
        return benchrun.http_get(port, "/readyz", {"Host": "127.0.0.1"})[0] == 200
    except OSError:
        return False


# =================================================================== report
def machine() -> dict:
    m = benchrun.machine_info()
    m["nproc"] = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    return m


def render(args: argparse.Namespace, a: dict | None, b: dict | None, m: dict, command: str, started: str,
           elapsed: float, load_before: list[str], load_after: list[str]) -> str:
    out = ["## Audit trail and tracing cost", ""]
    out.append(f"Produced by `bench/audit.py` (a benchmark, not a test). Command: `{command}`. "
               f"Run {started}; it took {elapsed:.0f} s.")
    out.append("")
    out.append(f"- Machine: `nproc` = {m['nproc']}; CPU: {m['cpu']}; {m['ram']} RAM; {m['os']}; Python {m['python']} "
               f"(mitmproxy {m['mitmproxy']}, cedarpy {m['cedarpy']})")
    out.append(f"- Load average before / after: {' '.join(load_before)} / {' '.join(load_after)}. **The machine was shared "
               "with other work during this run** (other engineers' builds and tests), so absolute numbers are "
               "depressed and noisy; the *other processes* column shows how many CPU cores other processes used during "
               "each phase. Compare configurations within this run, not with the figures above.")
    out.append("")
    if a is not None:
        e, s, f = a["emit"], a["split"], a["fsync"]
        out.append("### Audit throughput to the file sink (in-process)")
        out.append("")
        out.append(f"{e['events']:,} decision records (a pool of {a['pool']:,} distinct, realistic lines: 70% allowed "
                   "reads, 15% policy denials, 5% holds, 5% allowed updates, 5% refused without a token; all but the last "
                   "with their Cedar inputs) through `AuditTrail.emit` with the real `FileSink` (defaults: rotation at "
                   f"100 MiB, no fsync, default redaction) into a temporary directory on {f['filesystem']}.")
        out.append("")
        out.append("| measure | value |")
        out.append("|---|---:|")
        out.append(f"| events/s (one thread, end to end) | **{e['events_per_s']:,.0f}** |")
        out.append(f"| µs per event (wall) | {e['us_per_event']:.1f} |")
        out.append(f"| CPU µs per event | {e['cpu_us_per_event']:.1f} |")
        out.append(f"| bytes per event (average line) | {e['bytes_per_event']:,.0f} |")
        out.append(f"| rotations during the run | {e['rotations']} |")
        out.append(f"| `fsync: true`: events/s (µs per event) | {f['events_per_s']:,.0f} ({f['us_per_event']:.0f}) |")
        out.append(f"| chain check of the {e['verify']['events']:,} events written (`verify`) | "
                   f"{'intact' if e['verify']['ok'] else 'PROBLEMS'}, {e['verify']['seconds']:.1f} s |")
        out.append("")
        out.append(f"Cost split, each stage timed on its own over {s['events']:,} of the same records:")
        out.append("")
        out.append("| stage | wall µs per event | CPU µs per event | share of CPU |")
        out.append("|---|---:|---:|---:|")
        for name, key in (("`to_ocsf` (decision record → OCSF dict)", "to_ocsf"),
                          ("redaction (default keys + card-number pattern, whole event)", "redact"),
                          ("`Chain.link` (canonical JSON + SHA-256 + line JSON)", "chain_link"),
                          ("`write(2)` of the line (O_APPEND, page cache)", "write")):
            out.append(f"| {name} | {s[key + '_us']:.1f} | {s[key + '_cpu_us']:.1f} | "
                       f"{s[key + '_cpu_us'] / s['sum_cpu_us'] * 100:.0f}% |")
        out.append(f"| sum | {s['sum_us']:.1f} | {s['sum_cpu_us']:.1f} | |")
        out.append("")
        out.append(f"Redaction with the default keys but no pattern costs {s['redact_keys_only_cpu_us']:.1f} CPU µs per "
                   "event: most of the redaction cost is walking and copying the whole event, the rest is the "
                   "card-number regex over every string.")
        out.append("")
    if b is not None:
        out.append("### Request-path cost: audit on/off × tracing on/off (end to end)")
        out.append("")
        out.append(textwrap.dedent(f"""\
            Four `proctor run` processes of the bench/run.py deployment (500 generated Cedar policies, ES256 JWT,
            `GET /items/1` classified as `bench.item.read`), identical except for `audit: {{enabled: false}}` and
            `OTEL_TRACES_EXPORTER=otlp` (http/protobuf, BatchSpanProcessor defaults) exporting to a local OTLP/HTTP
            sink that answers 200. The decision record is written in all four; "audit on" is the default audit
            configuration (file sink, `fail_closed`, redaction). Load generator: {b['generator']}
            ({'wrk' if b['generator'] == 'wrk' else 'bench/loadgen.py, Python asyncio, ' + str(args.py_procs) + ' processes'});
            CPU layout {b['layout']['proxy']} for the proxy, {b['layout']['client']} for the load generator, upstream
            and OTLP sink. Throughput: {b['connections']} connections, closed loop, {b['duration_s']:g} s per phase after
            {args.warmup:g} s warm-up. Latency: {b['latency_connections']} connections, random think time of mean
            {b['think_ms']:g} ms, {b['latency_duration_s']:g} s per phase. Order ABCD then DCBA
            and so on ({b['repeats']} repeats); each cell is the median across the repeats, with every phase below.
            On a shared machine the proxy's CPU time per request (from /proc, throughput phases) is the steadier
            measure of what a feature costs; req/s and latency also move with whatever else the machine runs.""").replace("\n", " "))
        out.append("")
        rows = {}
        for ph in b["phases"]:
            rows.setdefault((ph["config"], ph["kind"]), []).append(ph)

        def mean(vals):  # the median of the repeats (robust to one disturbed phase on a shared machine)
            vals = [v for v in vals if v is not None]
            return statistics.median(vals) if vals else float("nan")

        base_t = mean([p["rps"] for p in rows.get(("B", "throughput"), [])])
        base_l = mean([p["p50_ms"] for p in rows.get(("B", "latency"), [])])
        base_cpu = mean([p["proxy_us_per_req"] for p in rows.get(("B", "throughput"), [])])
        out.append("| configuration | max req/s | vs. audit off, tracing off | proxy CPU µs/req | Δ CPU µs/req | p50 (ms) | p99 (ms) | Δ p50 (ms) | non-2xx / errors | other processes (cores) |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for key in ("B", "A", "D", "C"):
            t, lat = rows.get((key, "throughput"), []), rows.get((key, "latency"), [])
            if not t or not lat:
                continue
            rps = mean([p["rps"] for p in t])
            cpu = mean([p["proxy_us_per_req"] for p in t])
            p50, p99 = mean([p["p50_ms"] for p in lat]), mean([p["p99_ms"] for p in lat])
            errs = sum(p["non2xx"] for p in t + lat), sum(p["errors"] for p in t + lat)
            other = max(p["other_cores"] for p in t + lat)
            out.append(f"| {key}: {CONFIGS[key][0]} | {rps:,.0f} | {rps / base_t * 100:.1f}% | {cpu:,.0f} | "
                       f"{cpu - base_cpu:+,.0f} | {p50:.3f} | {p99:.3f} | {p50 - base_l:+.3f} | {errs[0]} / {errs[1]} | "
                       f"≤ {other:.2f} |")
        out.append("")
        out.append("Per phase, in the order run:")
        out.append("")
        out.append("| phase | config | repeat | req/s | p50 (ms) | p90 (ms) | p99 (ms) | proxy CPU µs/req | other processes (cores) |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for ph in b["phases"]:
            out.append(f"| {ph['kind']} | {ph['config']}: {ph['label']} | {ph['repeat']} | {ph['rps']:,.0f} | "
                       f"{ph['p50_ms']:.3f} | {ph['p90_ms']:.3f} | {ph['p99_ms']:.3f} | "
                       f"{benchrun.fmt(ph['proxy_us_per_req'], 0)} | {ph['other_cores']:.2f} |")
        out.append("")
        out.append("Checks: " + "; ".join(b["checks"]) + ".")
        if b.get("otlp_exports"):
            out.append(f"The OTLP sink received {b['otlp_exports']['requests']:,} export requests "
                       f"({b['otlp_exports']['bytes'] / 1e6:,.1f} MB of spans).")
        out.append("")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["a", "b", "both"], default="both")
    ap.add_argument("--events", type=int, default=200_000, help="part A: events through AuditTrail.emit")
    ap.add_argument("--max-seconds", type=float, default=50.0, help="part A: stop the emit loop after this long")
    ap.add_argument("--pool", type=int, default=2000, help="part A: distinct records cycled through")
    ap.add_argument("--split-events", type=int, default=50_000, help="part A: events for the per-stage split")
    ap.add_argument("--fsync-events", type=int, default=5000)
    ap.add_argument("--fsync-seconds", type=float, default=5.0)
    ap.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    ap.add_argument("--duration", type=float, default=6.0, help=f"part B: seconds per throughput phase (<= {MAX_PHASE_S:g})")
    ap.add_argument("--latency-duration", type=float, default=6.0, help=f"part B: seconds per latency phase (<= {MAX_PHASE_S:g})")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--latency-connections", type=int, default=4)
    ap.add_argument("--think-ms", type=float, default=20.0, help="part B: mean think time at moderate load")
    ap.add_argument("--repeats", type=int, default=3, help="part B: ABCD, DCBA, ABCD, ... (default 3)")
    ap.add_argument("--policies", type=int, default=500)
    ap.add_argument("--py-procs", type=int, default=2)
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--wait-quiet", type=float, default=5.0, help="part B: wait up to this long for a quiet machine first")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the markdown section to this file")
    args = ap.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    t0 = time.monotonic()
    m = machine()
    tmp = Path(tempfile.mkdtemp(prefix="proctor-bench-audit-"))
    a = b = None
    try:
        if args.part in ("a", "both"):
            print("part A: audit throughput to the file sink (in-process)", flush=True)
            a = part_a(args, tmp)
            e, s = a["emit"], a["split"]
            print(f"  {e['events']:,} events: {e['events_per_s']:,.0f} events/s, {e['us_per_event']:.1f} µs/event, "
                  f"{e['bytes_per_event']:,.0f} bytes/event, verify {'ok' if e['verify']['ok'] else 'FAILED'}")
            print(f"  split (CPU µs/event): to_ocsf {s['to_ocsf_cpu_us']:.1f}, redact {s['redact_cpu_us']:.1f} "
                  f"(keys only {s['redact_keys_only_cpu_us']:.1f}), chain.link {s['chain_link_cpu_us']:.1f}, "
                  f"write {s['write_cpu_us']:.1f} (sum {s['sum_cpu_us']:.1f}; wall {s['sum_us']:.1f})")
            print(f"  fsync: true: {a['fsync']['events_per_s']:,.0f} events/s", flush=True)
        if args.part in ("b", "both"):
            b = part_b(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - t0
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    command = ".venv/bin/python bench/audit.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    md = render(args, a, b, m, command.strip(), started, elapsed, load_before, load_after)
    print("\n" + md)
    if args.json:
        args.json.write_text(json.dumps({"machine": m, "a": a, "b": b, "started": started}, indent=2, default=str))
    if args.markdown:
        args.markdown.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
