"""Replicas on one PostgreSQL store (issue 15): cross-replica wake-up latency and aggregate
throughput of one and two replicas.

Two `proctor run` forward proxies (A and B) share one PostgreSQL schema, with the same
connector (bench/upstream.py) and a policy set where `GET /items/{id}` is allowed and
`DELETE /items/{id}` is held for a person (`@approval("managers")`, sync mode).

- **approval wake-up**: an agent's DELETE is held (waiting) on A; a manager approves it
  through B's control API; measured from B's answer to the approve call to A's answer to
  the agent (the forwarded DELETE). Goal: p50 <= 100 ms, p99 <= 300 ms.
- **suspension**: an operator suspends an agent through B; A is polled with that agent's
  GET every 5 ms; measured from B's answer to the first refusal from A. Goal: p50 <= 100 ms.
- **throughput**: GET requests per second, closed loop, through A alone, then through A
  and B at once (the load split evenly); and each replica's CPU per request.

    .venv/bin/python bench/replicas.py [--trials 30] [--requests 3000] [--connections 8] \\
        [--pg postgresql://postgres@127.0.0.1:5432/test] [--json out.json]

The schema (`?schema=bench_replicas_<random>`) is dropped at the end. The numbers are
copied into docs/performance.md ("## Replicas") by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import proctor_env  # noqa: E402
from coordination import drive, drop_schema  # noqa: E402
from run import free_port, port_open, proc_cpu_seconds, wait_for  # noqa: E402

POLICIES = """
@id("bench-read")
permit (principal, action == Action::"bench.item.read", resource);

@id("bench-delete")
permit (principal, action == Action::"bench.item.delete", resource);

@id("bench-delete-held")
@approval("managers")
forbid (principal, action == Action::"bench.item.delete", resource)
unless { context has approval && context.approval.groups.contains("managers") };
"""


def token(key, sub: str, aud: str = proctor_env.AUDIENCE, **claims) -> str:
    now = int(time.time())
    payload = {"iss": proctor_env.ISSUER, "aud": aud, "sub": sub, "iat": now, "nbf": now, "exp": now + 3600,
               "jti": uuid.uuid4().hex, **claims}
    return jwt.encode(payload, key, algorithm="ES256", headers={"kid": proctor_env.KID})


def build(base: Path, upstream_port: int, dsn: str) -> tuple[dict[str, tuple[Path, int, int]], object]:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": proctor_env.KID, "use": "sig", "alg": "ES256"})
    (base / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    (base / "connectors").mkdir()
    (base / "connectors" / "bench.yaml").write_text(
        yaml.safe_dump(proctor_env.connector_manifest(upstream_port), sort_keys=False))
    (base / "policies").mkdir()
    shutil.copy(ROOT / "policies" / "schema.cedarschema", base / "policies" / "schema.cedarschema")
    (base / "policies" / "bench.cedar").write_text(POLICIES)
    out = {}
    for name in ("a", "b"):
        port, cport = free_port(), free_port()
        cfg = proctor_env._config(f"state-{name}", port, cport)
        cfg["identity"]["principal"] = {"attributes": {"team": "team"}, "groups_claim": "groups"}
        cfg["store"] = {"url": dsn}
        cfg["replica_id"] = f"replica-{name}"
        cfg["policies"]["source"] = "store"
        cfg["approvals"] = {"mode": "sync", "sync_wait_seconds": 30, "expire_after_seconds": 120}
        path = base / f"proctor-{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        out[name] = (path, port, cport)
    return out, key


def proxied(port: int, method: str, upstream_port: int, path: str, bearer: str, timeout: float = 60) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{upstream_port}{path}", method=method,
                                 headers={"Proxy-Authorization": f"Bearer {bearer}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{port}"}))
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def control(cport: int, method: str, path: str, bearer: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{cport}{path}", data=data, method=method,
                                 headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"{}")


def approval_trial(a: tuple[int, int], b: tuple[int, int], up: int, key, manager: str, i: int) -> float:
    agent = f"held-{i}-{uuid.uuid4().hex[:6]}"
    answered: dict[str, float] = {}

    def send() -> None:
        st = proxied(a[0], "DELETE", up, f"/items/{i}", token(key, agent))
        answered["t"] = time.perf_counter()
        answered["status"] = st

    t = threading.Thread(target=send)
    t.start()
    aid = None
    deadline = time.monotonic() + 20
    while aid is None and time.monotonic() < deadline:
        got = control(b[1], "GET", f"/v1/approvals?state=pending&agent={agent}", manager).get("approvals", [])
        aid = got[0]["id"] if got else None
        time.sleep(0.02)
    if aid is None:
        raise RuntimeError("the request was not held")
    time.sleep(0.3)  # (waiting on A now)
    control(b[1], "POST", f"/v1/approvals/{aid}/approve", manager, {"reason": "bench"})
    decided = time.perf_counter()
    t.join(60)
    if answered.get("status") != 200:
        raise RuntimeError(f"the approved request got {answered.get('status')}")
    return answered["t"] - decided


def suspension_trial(a: tuple[int, int], b: tuple[int, int], up: int, key, operator: str, i: int) -> float:
    agent = f"susp-{i}-{uuid.uuid4().hex[:6]}"
    bearer = token(key, agent)
    if proxied(a[0], "GET", up, "/items/1", bearer) != 200:
        raise RuntimeError("not allowed before the suspension")
    control(b[1], "POST", f"/v1/agents/{agent}/suspend", operator, {"reason": "bench"})
    done = time.perf_counter()
    while proxied(a[0], "GET", up, "/items/1", bearer) == 200:
        time.sleep(0.005)
    return time.perf_counter() - done


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def dist(xs: list[float]) -> dict:
    ms = [x * 1000 for x in xs]
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 1), "p90_ms": round(pct(ms, 90), 1),
            "p99_ms": round(pct(ms, 99), 1), "max_ms": round(max(ms), 1), "mean_ms": round(statistics.mean(ms), 1)}


def throughput(ports: list[tuple[int, int]], up: int, bearer: str, total: int, connections: int) -> dict:
    head = (f"GET http://127.0.0.1:{up}/items/1 HTTP/1.1\r\nHost: 127.0.0.1:{up}\r\n"
            f"Proxy-Authorization: Bearer {bearer}\r\n\r\n").encode()

    async def all_of() -> list:
        return await asyncio.gather(*(drive(p, lambda: head, total // len(ports), connections // len(ports))
                                      for p, _pid in ports))

    cpu0 = [proc_cpu_seconds(pid) for _p, pid in ports]
    t0 = time.perf_counter()
    runs = asyncio.run(all_of())
    seconds = time.perf_counter() - t0
    cpu = [proc_cpu_seconds(pid) - c for (_p, pid), c in zip(ports, cpu0)]
    n = sum(len(r.lat) for r, _s in runs)
    statuses: dict[int, int] = {}
    for r, _s in runs:
        for st, k in r.statuses.items():
            statuses[st] = statuses.get(st, 0) + k
    return {"replicas": len(ports), "requests": n, "rps": round(n / seconds), "statuses": statuses,
            "cpu_us_per_request": round(sum(cpu) / n * 1e6)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="proctor-replicas-"))
    schema = "bench_replicas_" + uuid.uuid4().hex[:10]
    dsn = f"{a.pg}{'&' if '?' in a.pg else '?'}schema={schema}"
    up = free_port()
    configs, key = build(base, up, dsn)
    procs: list[subprocess.Popen] = []
    py = sys.executable
    try:
        procs.append(subprocess.Popen([py, str(BENCH / "upstream.py"), "--port", str(up)],
                                      stdout=open(base / "upstream.log", "w"), stderr=subprocess.STDOUT))
        wait_for(lambda: port_open(up), 10, "upstream")
        ports = {}
        for name, (cfg, port, cport) in configs.items():
            p = subprocess.Popen([py, "-m", "proxy.cli", "run", "-c", str(cfg), "--log-level", "warning"],
                                 stdout=open(base / f"proctor-{name}.log", "w"), stderr=subprocess.STDOUT,
                                 cwd=str(base), env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT)))
            procs.append(p)

            def ready(cport: int = cport) -> bool:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{cport}/readyz", timeout=1) as r:
                        return r.status == 200
                except Exception:  # noqa: BLE001
                    return False

            wait_for(ready, 60, f"proctor {name}", proc=p, log=base / f"proctor-{name}.log")
            ports[name] = (port, cport, p.pid)
        A, B = ports["a"][:2], ports["b"][:2]
        manager = token(key, "mia", aud="proctor-approvers", approval_groups=["managers"])
        operator = token(key, "olga", aud="proctor-approvers", approval_groups=["proctor-admins"])
        approvals = [approval_trial(A, B, up, key, manager, i) for i in range(a.trials)]
        print("approval wake-up", dist(approvals), flush=True)
        suspensions = [suspension_trial(A, B, up, key, operator, i) for i in range(a.trials)]
        print("suspension", dist(suspensions), flush=True)
        reader = token(key, "reader", groups=["bench-readers"])
        proxied(A[0], "GET", up, "/items/1", reader)
        proxied(B[0], "GET", up, "/items/1", reader)
        one = throughput([(ports["a"][0], ports["a"][2])], up, reader, a.requests, a.connections)
        two = throughput([(ports["a"][0], ports["a"][2]), (ports["b"][0], ports["b"][2])], up, reader,
                         a.requests, a.connections)
        print("throughput 1 replica", one, flush=True)
        print("throughput 2 replicas", two, flush=True)
        out = {"approval_wakeup": dist(approvals), "suspension": dist(suspensions), "throughput": [one, two],
               "machine": {"cpus": os.cpu_count()}, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        if a.json:
            a.json.write_text(json.dumps(out, indent=1))
        return 0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        drop_schema(a.pg, schema)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
