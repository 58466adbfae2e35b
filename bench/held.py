"""Benchmark: 10,000 requests held for approval at once (sync mode).

What it answers: what does a held request cost the proxy (memory per held
connection), does the event loop stay responsive while thousands of agents
wait (control-API latency, sampled every 100 ms), how fast can approvers
release them (approvals/s through the API), and does every held request reach
the upstream exactly once with its own answer going back to its own agent.

Processes (loopback only):

- a recording upstream (this file, `--upstream`): raw asyncio, counts each
  request path, answers `{"path": ...}` with `Connection: close`;
- Proctor (`proxy.cli run`) with a connector `POST /orders/{id}` ->
  `bench.order.create` and a policy that holds every such request for
  `@approval("managers")`; approvals in sync mode (`sync_wait_seconds` 3600),
  the default SQLite store, the decision record on;
- the agents (this file, `--agents`): one process, N raw asyncio connections,
  each sending one held `POST http://127.0.0.1:UP/orders/<i>` and waiting for
  the answer;
- this process: samples `GET /healthz` and `GET /v1/approvals?limit=10`
  every 100 ms in a thread, reads VmRSS/VmHWM from /proc/<pid>/status, and
  approves every held request through the control API.

    .venv/bin/python bench/held.py                 # 10,000 held requests
    .venv/bin/python bench/held.py -n 1000 --json out.json

RLIMIT_NOFILE: the soft limit is raised to the hard limit here and in every
child (`preexec_fn`); with N held agents the proxy needs N client sockets plus
the upstream sockets of the requests it is forwarding, so N must stay well
under the hard limit (checked up front).

Bounded: `--budget` (default 280 s) caps the wall time. When approving is too
slow to release all N in time, the approvals not yet sent are skipped, the
agents still waiting are told to stop, and the summary says how many were
released (`approve.statuses`, `agents.errors.unanswered`, `ok: false`); what
was released is still checked for exactly-once delivery.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

MANAGERS = "managers"
AGENT = "held-bench-agent"
APPROVER = "held-bench-approver"


# ------------------------------------------------------------------ fd limits
def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _preexec() -> None:
    raise_nofile()


# ------------------------------------------------------------- the upstream
class _Upstream(asyncio.Protocol):
    counts: dict[str, int] = {}

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].decode("latin-1")
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if len(self.buf) < end + 4 + length:
            return
        method, target, _ = head.split("\r\n", 1)[0].split(" ", 2)
        if target == "/__counts":
            c = self.counts
            body = json.dumps(
                {"requests": sum(c.values()), "distinct": len(c), "not_once": {k: v for k, v in c.items() if v != 1}}
            ).encode()
        else:
            self.counts[target] = self.counts.get(target, 0) + 1
            body = json.dumps({"path": target, "method": method}).encode()
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        self.transport.close()


async def run_upstream(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Upstream, "127.0.0.1", port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


# --------------------------------------------------------------- the agents
async def run_agents(proxy_port: int, upstream_port: int, token: str, n: int, connect_parallel: int, timeout: float) -> None:
    """N connections, one held request each; JSON lines on stdout: `sent`, then `done`."""
    connect = asyncio.Semaphore(connect_parallel)
    sent = 0
    t0 = time.monotonic()
    statuses: dict[str, int] = {}
    wrong_answer: list[int] = []
    errors: dict[str, int] = {}
    answered_at: list[float] = []
    all_sent = asyncio.Event()

    def emit(**kw) -> None:
        sys.stdout.write(json.dumps(kw) + "\n")
        sys.stdout.flush()

    async def one(i: int) -> None:
        nonlocal sent
        writer = None
        try:
            async with connect:
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
                body = json.dumps({"order": {"id": i, "total": 100}}).encode()
                writer.write(
                    (
                        f"POST http://127.0.0.1:{upstream_port}/orders/{i} HTTP/1.1\r\n"
                        f"Host: 127.0.0.1:{upstream_port}\r\n"
                        f"Proxy-Authorization: Bearer {token}\r\n"
                        "Content-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n"
                    ).encode()
                    + body
                )
                await writer.drain()
            sent += 1
            if sent == n:
                all_sent.set()
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = lines[0].split(" ")[1]
            length = 0
            for line in lines[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v.strip())
            data = await reader.readexactly(length)
            answered_at.append(time.monotonic() - t0)
            statuses[status] = statuses.get(status, 0) + 1
            if status == "200" and json.loads(data).get("path") != f"/orders/{i}":
                wrong_answer.append(i)
        except Exception as e:  # noqa: BLE001 - counted and reported
            key = type(e).__name__
            errors[key] = errors.get(key, 0) + 1
            if sent < n and not all_sent.is_set():
                sent += 1
                if sent == n:
                    all_sent.set()
        finally:
            if writer is not None:
                writer.close()

    async def announce() -> None:
        await all_sent.wait()
        emit(event="sent", n=n, seconds=round(time.monotonic() - t0, 3))

    ann = asyncio.create_task(announce())
    work = asyncio.ensure_future(asyncio.gather(*(one(i) for i in range(n))))
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, work.cancel)  # report what we have
    try:
        await asyncio.wait_for(work, timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        pass
    unanswered = n - sum(statuses.values()) - sum(errors.values())
    if unanswered:
        errors["unanswered"] = unanswered
    ann.cancel()
    emit(
        event="done",
        statuses=statuses,
        errors=errors,
        wrong_answer=wrong_answer[:20],
        wrong_answers=len(wrong_answer),
        first_answer_s=round(min(answered_at), 3) if answered_at else None,
        last_answer_s=round(max(answered_at), 3) if answered_at else None,
    )


# ------------------------------------------------------------- orchestration
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, what: str, interval: float = 0.1) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def http(method: str, url: str, token: str | None = None, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw and r.headers.get_content_type().endswith("json") else {})
    except urllib.error.HTTPError as e:
        return e.code, {}


def metric(control: str, name: str) -> float | None:
    with urllib.request.urlopen(f"{control}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return None


class Sampler(threading.Thread):
    """GET /healthz and GET /v1/approvals?limit=10 every `interval` s; latencies per phase (ms)."""

    def __init__(self, control: str, token: str, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.control, self.token, self.interval = control, token, interval
        self.phase = "idle"
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.failures: dict[str, int] = {}
        self.stop = threading.Event()

    def _one(self, name: str, url: str, token: str | None) -> None:
        t = time.perf_counter()
        try:
            status, _ = http("GET", url, token, timeout=10)
            ok = status == 200
        except Exception:  # noqa: BLE001
            ok = False
        ms = (time.perf_counter() - t) * 1000
        phase = self.phase
        if ok:
            self.samples.setdefault(phase, {}).setdefault(name, []).append(ms)
        else:
            self.failures[f"{phase}/{name}"] = self.failures.get(f"{phase}/{name}", 0) + 1

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.monotonic()
            self._one("healthz", f"{self.control}/healthz", None)
            self._one("approvals", f"{self.control}/v1/approvals?limit=10", self.token)
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - t)))

    def summary(self) -> dict:
        def pct(vals: list[float], q: float) -> float:
            s = sorted(vals)
            return round(s[min(len(s) - 1, int(q * len(s)))], 2)

        out = {}
        for phase, by in self.samples.items():
            for name, vals in by.items():
                out[f"{phase}/{name}"] = {"n": len(vals), "p50_ms": pct(vals, 0.5), "p99_ms": pct(vals, 0.99),
                                          "max_ms": round(max(vals), 2)}
        return out


SCHEMA = """
type Time = { now: datetime, epoch: Long, hour: Long, weekday: Long };
type Headers = { "content-type"?: String, "user-agent"?: String, "idempotency-key"?: String };
type Approval = { id: String, approver: String, approvers: Set<String>, groups: Set<String>, time: datetime, note: String };
type RequestContext = {
  method: String, path: String, query: String, host: String, port: Long, headers: Headers,
  connector: String, risk: String, time: Time, source_ip: ipaddr, mode: String,
};
type OrderContext = {
  method: String, path: String, query: String, host: String, port: Long, headers: Headers,
  connector: String, risk: String, time: Time, source_ip: ipaddr, mode: String,
  approval?: Approval,
};
entity AgentGroup;
entity Agent in [AgentGroup];
entity HttpHost;
entity Order;
action "http.request" appliesTo { principal: Agent, resource: HttpHost, context: RequestContext };
action "bench.order.create" appliesTo { principal: Agent, resource: Order, context: OrderContext };
"""

POLICIES = """
@id("writers-create-orders")
permit (principal in AgentGroup::"writers", action == Action::"bench.order.create", resource is Order);

@id("every-order-needs-a-manager")
@approval("managers")
forbid (principal, action == Action::"bench.order.create", resource is Order)
unless { context has approval && context.approval.groups.contains("managers") };
"""


def build(base: Path, upstream_port: int, port: int, control_port: int) -> tuple[Path, str, str]:
    import jwt
    import yaml
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    issuer = "https://idp.held-bench.invalid"
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": "hb-1", "use": "sig", "alg": "ES256"})
    (base / "jwks.json").write_text(json.dumps({"keys": [jwk]}))

    def token(sub: str, aud: str, **claims) -> str:
        now = int(time.time())
        payload = {"iss": issuer, "aud": aud, "sub": sub, "iat": now, "nbf": now, "exp": now + 3600, **claims}
        return jwt.encode(payload, key, algorithm="ES256", headers={"kid": "hb-1"})

    (base / "policies").mkdir()
    (base / "policies" / "schema.cedarschema").write_text(SCHEMA)
    (base / "policies" / "held.cedar").write_text(POLICIES)
    (base / "connectors").mkdir()
    manifest = {
        "name": "heldbench",
        "description": "held-requests benchmark upstream",
        "hosts": [f"127.0.0.1:{upstream_port}"],
        "routes": [{"method": "POST", "path": "/orders/{id}", "action": "bench.order.create",
                    "resource": {"type": "Order", "id": "{id}"}}],
    }
    (base / "connectors" / "heldbench.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    cfg = {
        "state_dir": "state",
        "listen": {"host": "127.0.0.1", "port": port},
        "control": {"listen": {"host": "127.0.0.1", "port": control_port}},
        "identity": {
            "issuers": [{"issuer": issuer, "audience": "proctor", "jwks_file": "jwks.json", "algorithms": ["ES256"]}],
            "principal": {"groups_claim": "groups"},
        },
        "dev_issuer": {"enabled": False},
        "connectors_dir": "connectors",
        "policies": {"dir": "policies", "reload_interval_seconds": 5.0},
        "approvals": {"mode": "sync", "sync_wait_seconds": 3600, "expire_after_seconds": 3600},
    }
    config = base / "proctor.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return (
        config,
        token(AGENT, "proctor", groups=["writers"]),
        token(APPROVER, "proctor-approvers", approval_groups=[MANAGERS]),
    )


async def approve_all(control: str, token: str, ids: list[str], parallel: int, deadline: float) -> dict:
    import aiohttp

    statuses: dict[int, int] = {}
    lat: list[float] = []
    sem = asyncio.Semaphore(parallel)
    conn = aiohttp.TCPConnector(limit=parallel)
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(connector=conn, headers=headers, timeout=aiohttp.ClientTimeout(total=120)) as s:

        async def one(aid: str) -> None:
            async with sem:
                if time.monotonic() > deadline:
                    statuses["not sent (time budget)"] = statuses.get("not sent (time budget)", 0) + 1
                    return
                t = time.perf_counter()
                try:
                    async with s.post(f"{control}/v1/approvals/{aid}/approve", json={"reason": "bench: approved"}) as r:
                        await r.read()
                        statuses[r.status] = statuses.get(r.status, 0) + 1
                except Exception as e:  # noqa: BLE001
                    statuses[type(e).__name__] = statuses.get(type(e).__name__, 0) + 1
                lat.append((time.perf_counter() - t) * 1000)

        t0 = time.monotonic()
        await asyncio.gather(*(one(a) for a in ids))
        seconds = time.monotonic() - t0
    lat.sort()
    return {
        "statuses": statuses,
        "seconds": round(seconds, 2),
        "per_second": round(len(lat) / seconds, 1),
        "vote_p50_ms": round(lat[len(lat) // 2], 1),
        "vote_p99_ms": round(lat[int(len(lat) * 0.99) - 1], 1),
    }


def pending_ids(control: str, token: str, expected: int) -> list[str]:
    ids: list[str] = []
    offset = 0
    while True:
        status, body = http("GET", f"{control}/v1/approvals?state=pending&limit=1000&offset={offset}", token, timeout=60)
        assert status == 200, status
        page = [a["id"] for a in body["approvals"]]
        ids += page
        offset += len(page)
        if not page or offset >= body["total"]:
            break
    return ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--held", type=int, default=10_000, help="concurrently held requests (default 10000)")
    ap.add_argument("--connect-parallel", type=int, default=256, help="agent connections being opened at once")
    ap.add_argument("--approve-parallel", type=int, default=32, help="approval API calls in flight")
    ap.add_argument("--held-seconds", type=float, default=10.0, help="how long to sample while all are held")
    ap.add_argument("--budget", type=float, default=280.0,
                    help="wall-time budget in seconds: approving stops when it runs out and the rest is reported")
    ap.add_argument("--json", type=Path, help="also write the summary here")
    ap.add_argument("--keep-tmp", action="store_true")
    # internal roles
    ap.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--agents", nargs=4, metavar=("PROXY_PORT", "UPSTREAM_PORT", "TOKEN_FILE", "TIMEOUT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    soft, hard = raise_nofile()
    if a.upstream:
        asyncio.run(run_upstream(a.upstream))
        return 0
    if a.agents:
        pp, up, tf, tmo = a.agents
        asyncio.run(run_agents(int(pp), int(up), Path(tf).read_text().strip(), a.held, a.connect_parallel, float(tmo)))
        return 0

    n = a.held
    if n + 2000 > soft:
        raise SystemExit(f"RLIMIT_NOFILE is {soft}: too low for {n} held requests (need about n + 2000 per process)")
    t_start = time.monotonic()
    deadline = t_start + a.budget
    base = Path(tempfile.mkdtemp(prefix="proctor-held-"))
    up_port, port, control_port = free_port(), free_port(), free_port()
    control = f"http://127.0.0.1:{control_port}"
    config, agent_token, approver_token = build(base, up_port, port, control_port)
    (base / "agent.token").write_text(agent_token)
    procs: list[subprocess.Popen] = []
    py = sys.executable

    def spawn(cmd: list[str], log: str, **kw) -> subprocess.Popen:
        p = subprocess.Popen(cmd, stdout=open(base / log, "w"), stderr=subprocess.STDOUT, preexec_fn=_preexec, **kw)
        procs.append(p)
        return p

    summary: dict = {"held": n, "rlimit_nofile": soft, "cpus": os.cpu_count()}
    sampler = Sampler(control, approver_token)
    try:
        spawn([py, str(Path(__file__).resolve()), "--upstream", str(up_port)], "upstream.log")
        proctor = spawn([py, "-m", "proxy.cli", "run", "-c", str(config), "--log-level", "warning"], "proctor.log",
                        cwd=str(base), env=dict(os.environ, PYTHONUNBUFFERED="1"))

        def ready() -> bool:
            if proctor.poll() is not None:
                raise RuntimeError((base / "proctor.log").read_text())
            try:
                return http("GET", f"{control}/readyz", timeout=1)[0] == 200
            except Exception:  # noqa: BLE001
                return False

        wait_for(ready, 30, "proctor readiness")
        pid = proctor.pid
        time.sleep(1.0)
        sampler.start()
        time.sleep(3.0)  # idle baseline latencies
        before = proc_status(pid)
        summary["rss_before_mib"] = round(before["VmRSS"] / 1024, 1)

        # ---- hold N
        sampler.phase = "holding"
        t0 = time.monotonic()
        cpu0 = cpu_seconds(pid)
        agents = subprocess.Popen(
            [py, str(Path(__file__).resolve()), "-n", str(n), "--connect-parallel", str(a.connect_parallel),
             "--agents", str(port), str(up_port), str(base / "agent.token"), str(a.budget)],
            stdout=subprocess.PIPE, stderr=open(base / "agents.log", "w"), text=True, preexec_fn=_preexec,
        )
        procs.append(agents)
        sent_line = json.loads(agents.stdout.readline() or "{}")
        summary["agents_sent_s"] = sent_line.get("seconds")

        def all_held() -> bool:
            if agents.poll() is not None:
                raise RuntimeError("the agents exited early: " + agents.stdout.read())
            return (metric(control, "proctor_approvals_held_connections") or 0) >= n

        wait_for(all_held, max(10.0, deadline - time.monotonic() - 60), f"{n} held connections", 0.2)
        summary["time_to_hold_all_s"] = round(time.monotonic() - t0, 2)
        summary["hold_rate_per_s"] = round(n / summary["time_to_hold_all_s"], 1)
        summary["proxy_cpu_s_holding"] = round(cpu_seconds(pid) - cpu0, 2)

        # ---- all held: memory and responsiveness
        sampler.phase = "held"
        time.sleep(1.0)
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
        time.sleep(a.held_seconds)
        summary["proxy_cpu_pct_while_held"] = round(100 * (cpu_seconds(pid) - cpu1) / (time.monotonic() - t1), 1)
        held = proc_status(pid)
        summary["rss_held_mib"] = round(held["VmRSS"] / 1024, 1)
        summary["rss_per_held_kib"] = round((held["VmRSS"] - before["VmRSS"]) / n, 1)
        summary["proxy_open_fds_held"] = open_fds(pid)
        summary["pending_in_store"] = metric(control, "proctor_approvals_pending")

        # ---- approve all (within the time budget), then wait for every answer
        ids = pending_ids(control, approver_token, n)
        summary["pending_listed"] = len(ids)
        sampler.phase = "approving"
        t2 = time.monotonic()
        cpu2 = cpu_seconds(pid)
        summary["approve"] = asyncio.run(
            approve_all(control, approver_token, ids, a.approve_parallel, deadline - 15)
        )
        approved = summary["approve"]["statuses"].get(200, 0)

        def forwarded() -> bool:
            return http("GET", f"http://127.0.0.1:{up_port}/__counts")[1].get("requests", 0) >= approved

        try:
            wait_for(forwarded, max(1.0, deadline - time.monotonic() - 5), "the approved requests upstream", 0.2)
            summary["all_forwarded_after_s"] = round(time.monotonic() - t2, 2)
        except TimeoutError as e:
            summary["incomplete"] = str(e)
        summary["proxy_cpu_s_approving"] = round(cpu_seconds(pid) - cpu2, 2)
        try:
            out, _ = agents.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            agents.send_signal(signal.SIGTERM)  # the agents report what they have
            out, _ = agents.communicate(timeout=30)
        done = json.loads(out.strip().splitlines()[-1])
        sampler.phase = "after"
        time.sleep(1.0)
        summary["agents"] = done
        summary["upstream"] = http("GET", f"http://127.0.0.1:{up_port}/__counts")[1]
        summary["rss_peak_mib"] = round(proc_status(pid)["VmHWM"] / 1024, 1)
        summary["rss_after_mib"] = round(proc_status(pid)["VmRSS"] / 1024, 1)
        up = summary["upstream"]
        summary["ok"] = (
            done["statuses"] == {"200": n} and not done["errors"] and done["wrong_answers"] == 0
            and up["requests"] == n and up["distinct"] == n and not up["not_once"]
        )
    except Exception as e:  # noqa: BLE001 - reported in the summary
        summary["ok"] = False
        summary["error"] = f"{type(e).__name__}: {e}"
    finally:
        sampler.stop.set()
        summary["control_api"] = sampler.summary()
        summary["control_api_failures"] = sampler.failures
        summary["wall_s"] = round(time.monotonic() - t_start, 1)
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
        if a.keep_tmp:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)

    print(json.dumps(summary, indent=2))
    if a.json:
        a.json.write_text(json.dumps(summary, indent=2))
    print(markdown(summary))
    return 0 if summary.get("ok") else 1


def markdown(s: dict) -> str:
    api = s.get("control_api", {})

    def lat(phase: str, name: str) -> str:
        v = api.get(f"{phase}/{name}")
        return f"{v['p50_ms']} / {v['p99_ms']} ms" if v else "n/a"

    ap = s.get("approve", {})
    rows = [
        ("held requests (sync mode, SQLite store)", f"{s['held']:,}"),
        ("time to hold all", f"{s.get('time_to_hold_all_s')} s ({s.get('hold_rate_per_s')}/s)"),
        ("proxy RSS before → all held", f"{s.get('rss_before_mib')} → {s.get('rss_held_mib')} MiB"),
        ("RSS per held request", f"{s.get('rss_per_held_kib')} KiB"),
        ("proxy RSS peak", f"{s.get('rss_peak_mib')} MiB"),
        ("proxy CPU while all held (idle agents)", f"{s.get('proxy_cpu_pct_while_held')} % of one core"),
        ("GET /healthz p50 / p99: idle", lat("idle", "healthz")),
        ("GET /healthz p50 / p99: all held", lat("held", "healthz")),
        ("GET /v1/approvals?limit=10 p50 / p99: idle", lat("idle", "approvals")),
        ("GET /v1/approvals?limit=10 p50 / p99: all held", lat("held", "approvals")),
        ("GET /healthz p50 / p99: while approving", lat("approving", "healthz")),
        ("approvals through the API", f"{ap.get('per_second')}/s ({ap.get('seconds')} s; vote p50 {ap.get('vote_p50_ms')} ms, p99 {ap.get('vote_p99_ms')} ms)"),
        ("all approved requests forwarded after", f"{s.get('all_forwarded_after_s')} s from the first approval"),
        ("agents: statuses / wrong answers / errors", f"{s.get('agents', {}).get('statuses')} / {s.get('agents', {}).get('wrong_answers')} / {s.get('agents', {}).get('errors')}"),
        ("upstream: requests / distinct / not exactly once", f"{s.get('upstream', {}).get('requests')} / {s.get('upstream', {}).get('distinct')} / {len(s.get('upstream', {}).get('not_once', {}))}"),
        ("all correct", "yes" if s.get("ok") else "NO"),
        ("wall time", f"{s.get('wall_s')} s"),
    ]
    return "\n".join(["| measure | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]])


if __name__ == "__main__":
    raise SystemExit(main())
