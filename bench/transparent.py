"""What transparent mode and monitor mode cost on the request path (issue 16).

Two network namespaces joined by a veth pair, built as tests/test_transparent_netns.py
builds them (tests/support/transparent_netns.py):

- "up": the upstream, bench/upstream.py's fixed 200 answer on `erp.test`
  (10.77.0.1) over plain HTTP on 8080 and HTTPS on 8443 (a certificate from a
  throwaway CA that Proctor trusts through `upstream.ca_file`);
- "agent": two `proctor run` processes as uid 1337, identical but for their
  ports, state directory and `monitor:` (ENFORCE: monitor off; MONITOR:
  `monitor: {global: true}`); both have the forward listener, the control API
  and a transparent listener, and `proctor netsetup --apply` redirects every TCP
  connection of every other uid to ENFORCE's transparent port (15001). The load
  generator runs there as uid 10001, with no proxy variable.

The same small requests, `GET /items/1` and `POST /items` with `{"qty": 1}`,
from the same load generator (stdlib asyncio, keep-alive connections, closed
loop: each connection sends its next request when the previous answer is in):

- forward-proxy mode, as an HTTP_PROXY client sends them: http:// in absolute
  form with `Proxy-Authorization: Bearer <jwt>`; https:// through `CONNECT`
  (the token on the CONNECT), then TLS to Proctor's interception certificate
  and origin-form requests inside the tunnel;
- transparent mode: the client connects to 10.77.0.1:8080 / :8443 itself, the
  redirect takes it to Proctor, origin-form requests naming `erp.test` in Host
  (and SNI); the identity is the workload token file (the same agent and token);
- monitor mode, over forward-proxy http: `GET /items/666`, which a forbid
  denies, through ENFORCE (403, not forwarded) and through MONITOR (monitored:
  recorded as the deny it would have been, then forwarded: 200), and the
  allowed `GET /items/1` through both.

Each scenario is one load-generator process that opens its connections (and
tunnels, and TLS sessions) and warms them up first, so connection set-up is
outside what is measured; then two measured phases, each bracketed by reads of
the Proctor process's utime+stime from /proc/<pid>/stat (all its threads):
a single connection sending `--latency-requests` one after the other (the
latency one agent sees), then `--connections` connections sending `--requests`
in all (throughput, latency under that load, and Proctor's CPU per request).
Every phase is bounded by `--max-seconds` too. Scenarios alternate order repeat
by repeat (forward, then reversed), and the report gives medians over repeats
with min-max, and the per-repeat paired differences, so drift on a shared
machine hits all alike. A pre-flight proves each scenario takes the path it is
meant to measure (status, Proctor-Monitor header, the decision record's mode,
agent and monitored part) before anything is measured.

    .venv/bin/python bench/transparent.py [--requests 1000] [--repeats 3] [--connections 4] \\
        [--latency-requests 300] [--backend iptables|nftables] [--json out.json]
    .venv/bin/python bench/transparent.py --render out.json   # the markdown again

Needs root (network namespaces), ip, setpriv, iptables (or nft) and curl, as the
netns tests do. Every namespace, rule, process and file it makes has a unique
name and is removed on exit, on failure, on Ctrl-C and on SIGTERM. Only the two
namespaces' loopback and veth carry traffic. Nothing here rewrites docs: the
numbers are copied into docs/performance.md ("## Transparent mode and monitor
mode") by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

ERP_IP, AGENT_IP, ERP_HOST = "10.77.0.1", "10.77.0.2", "erp.test"
HTTP_PORT, HTTPS_PORT = 8080, 8443
PROXY_UID, AGENT_UID = 1337, 10001
# Inside the agent namespace (private to it, so fixed ports cannot collide with anything).
PROCS = {"enforce": {"forward": 3128, "control": 9901, "transparent": 15001},
         "monitor": {"forward": 3129, "control": 9902, "transparent": 15002}}
REDIRECT_PORT = PROCS["enforce"]["transparent"]  # where netsetup sends the agent's connections
POST_BODY = '{"qty": 1}'

SCHEMA = """
type Time = { now: datetime, epoch: Long, hour: Long, weekday: Long };
type Headers = { "content-type"?: String, "user-agent"?: String, "idempotency-key"?: String };
type RequestContext = {
  method: String, path: String, query: String, host: String, port: Long, headers: Headers,
  connector: String, risk: String, time: Time, source_ip: ipaddr, mode: String,
};
entity AgentGroup;
entity Agent in [AgentGroup] { team?: String, level?: Long };
entity HttpHost;
action "http.request" appliesTo { principal: Agent, resource: HttpHost, context: RequestContext };
"""

POLICIES = """
@id("bench-read")
permit (principal, action == Action::"bench.item.read", resource);

@id("bench-create")
permit (principal, action == Action::"bench.item.create", resource);

@id("bench-no-666")
forbid (principal, action == Action::"bench.item.read", resource == Item::"666");
"""


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str
    proc: str  # enforce | monitor
    mode: str  # forward | transparent
    tls: bool
    method: str
    path: str
    expect: int  # the status every answer must have
    monitored: bool = False  # the answer carries Proctor-Monitor: deny


SCENARIOS = [
    Scenario("fwd-http-get", "GET, http://, forward proxy", "enforce", "forward", False, "GET", "/items/1", 200),
    Scenario("tp-http-get", "GET, http://, transparent", "enforce", "transparent", False, "GET", "/items/1", 200),
    Scenario("fwd-https-get", "GET, https://, forward proxy (CONNECT)", "enforce", "forward", True, "GET",
             "/items/1", 200),
    Scenario("tp-https-get", "GET, https://, transparent", "enforce", "transparent", True, "GET", "/items/1", 200),
    Scenario("fwd-http-post", "POST, http://, forward proxy", "enforce", "forward", False, "POST", "/items", 200),
    Scenario("tp-http-post", "POST, http://, transparent", "enforce", "transparent", False, "POST", "/items", 200),
    Scenario("fwd-https-post", "POST, https://, forward proxy (CONNECT)", "enforce", "forward", True, "POST",
             "/items", 200),
    Scenario("tp-https-post", "POST, https://, transparent", "enforce", "transparent", True, "POST", "/items", 200),
    Scenario("enforce-deny", "monitor off, denied GET (403, not forwarded)", "enforce", "forward", False, "GET",
             "/items/666", 403),
    Scenario("monitor-deny", "monitor on, denied GET (monitored: forwarded, 200)", "monitor", "forward", False,
             "GET", "/items/666", 200, monitored=True),
    Scenario("monitor-allow", "monitor on, allowed GET", "monitor", "forward", False, "GET", "/items/1", 200),
]
BY_NAME = {s.name: s for s in SCENARIOS}
# The allowed GET over forward-proxy http through the enforcing process is also monitor mode's baseline.
MONITOR_ROWS = [("fwd-http-get", "monitor off, allowed GET"), ("enforce-deny", None), ("monitor-deny", None),
                ("monitor-allow", None)]


# ------------------------------------------------------------------ the agent's load generator
# Runs as the agent's uid with the system interpreter (-S, stdlib only). One JSON argument.
CLIENT = r'''
import asyncio, json, ssl, sys, time

a = json.loads(sys.argv[1])
HOST = a["host"]
CTX = ssl.create_default_context(cafile=a["ca"])


def request_bytes(tunnelled):
    target = a["path"]
    head = []
    if a["mode"] == "forward" and not tunnelled:
        target = f"http://{HOST}:{a['port']}{a['path']}"
    head.append(f"{a['method']} {target} HTTP/1.1")
    head.append(f"Host: {HOST}:{a['port']}")
    if a["mode"] == "forward" and not tunnelled:
        head.append(f"Proxy-Authorization: Bearer {a['token']}")
    head.append("Accept: application/json")
    body = a.get("body") or ""
    if a["method"] == "POST":
        head += ["Content-Type: application/json", f"Content-Length: {len(body.encode())}"]
    return ("\r\n".join(head) + "\r\n\r\n" + body).encode()


async def read_response(r, bodyless=False):
    head = await r.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    if bodyless:
        return status, headers
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
            await r.readexactly(size + 2)
            if size == 0:
                break
    elif "content-length" in headers:
        await r.readexactly(int(headers["content-length"]))
    return status, headers


class Conn:
    async def open(self):
        tls = a["tls"]
        if a["mode"] == "forward":
            self.r, self.w = await asyncio.open_connection("127.0.0.1", a["proxy_port"])
            if tls:
                self.w.write((f"CONNECT {HOST}:{a['port']} HTTP/1.1\r\nHost: {HOST}:{a['port']}\r\n"
                              f"Proxy-Authorization: Bearer {a['token']}\r\n\r\n").encode())
                status, _ = await read_response(self.r, bodyless=True)
                if status != 200:
                    raise RuntimeError(f"CONNECT answered {status}")
                await self.w.start_tls(CTX, server_hostname=HOST)
        else:  # transparent: straight to the upstream's address; the redirect takes it to Proctor
            self.r, self.w = await asyncio.open_connection(a["ip"], a["port"], ssl=CTX if tls else None,
                                                           server_hostname=HOST if tls else None)
        self.req = request_bytes(tls)
        return self

    async def one(self):
        t0 = time.perf_counter_ns()
        self.w.write(self.req)
        status, headers = await read_response(self.r)
        ns = time.perf_counter_ns() - t0
        if headers.get("connection", "").lower() == "close":
            self.w.close()
            await self.open()
            reopened[0] += 1
        return status, headers, ns


reopened = [0]
sent = [0]


async def phase(conns, total, deadline):
    left = [total]
    lat, statuses = [], {}

    async def worker(c):
        while left[0] > 0 and time.monotonic() < deadline:
            left[0] -= 1
            status, _, ns = await c.one()
            sent[0] += 1
            lat.append(ns // 1000)
            statuses[status] = statuses.get(status, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    return {"seconds": time.perf_counter() - t0, "lat_us": lat, "statuses": statuses}


def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main():
    loop = asyncio.get_running_loop()
    if a.get("probe"):
        c = await Conn().open()
        status, headers, _ = await c.one()
        say({"status": status, "headers": headers})
        return
    conns = [await Conn().open() for _ in range(a["connections"])]
    for c in conns:
        for _ in range(a["warmup"]):
            await c.one()
            sent[0] += 1
    for name, n_conns, total in (("latency", 1, a["latency_requests"]), ("load", a["connections"], a["requests"])):
        say({"ready": name})
        if (await loop.run_in_executor(None, sys.stdin.readline)).strip() != "go":
            return
        out = await phase(conns[:n_conns], total, time.monotonic() + a["max_seconds"])
        say({"phase": name, **out})
    say({"done": True, "sent": sent[0], "reopened": reopened[0]})
    for c in conns:
        c.w.close()


asyncio.run(asyncio.wait_for(main(), a["max_seconds"] * 3 + 60))
'''


# ------------------------------------------------------------------ the upstream (in the "up" namespace)
def serve_upstream(host: str, cert: str, key: str) -> None:
    """bench/upstream.py's protocol on HTTP_PORT and, with TLS, on HTTPS_PORT."""
    import asyncio
    import ssl

    sys.path.insert(0, str(BENCH))
    from upstream import UpstreamProtocol

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        plain = await loop.create_server(UpstreamProtocol, host, HTTP_PORT, backlog=1024, reuse_address=True)
        tls = await loop.create_server(UpstreamProtocol, host, HTTPS_PORT, backlog=1024, reuse_address=True,
                                       ssl=ctx)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with plain, tls:
            await stop.wait()

    asyncio.run(main())


# ------------------------------------------------------------------ the namespaces
def sh(*argv: str, check: bool = True, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def why_not() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "setpriv", "curl", "ss"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 util-linux curl)"
    return None


class Bench:
    """The namespaces, the upstream, the two Proctor processes; `close()` removes everything."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.tag = secrets.token_hex(3)
        self.agent_ns, self.up_ns = f"pbta{self.tag}", f"pbtu{self.tag}"
        self.veth = (f"pbva{self.tag}", f"pbvu{self.tag}")
        self.base = Path(tempfile.mkdtemp(prefix="proctor-bench-transparent-", dir="/tmp"))
        self.made: list[str] = []
        self.hosts_dir: Path | None = None
        self.upstream: subprocess.Popen[bytes] | None = None
        self.proctors: dict[str, subprocess.Popen[bytes]] = {}
        self.token = ""
        self.closed = False

    # -- paths
    @property
    def pdir(self) -> Path:
        return self.base / "proctor"

    @property
    def agent_dir(self) -> Path:
        return self.base / "agent"

    def state(self, name: str) -> Path:
        return self.pdir / f"state-{name}"

    # -- building
    def build(self) -> None:
        self.base.chmod(0o755)
        for d in ("up", "agent"):
            (self.base / d).mkdir(mode=0o755)
        self._network()
        self._upstream()
        self._proctor_files()
        sh(sys.executable, "-m", "proxy.cli", "netsetup", "--apply", "--backend", self.backend, "--netns",
           self.agent_ns, "--proxy-uid", str(PROXY_UID), "--proxy-port", str(REDIRECT_PORT), cwd=str(ROOT))
        for name in PROCS:
            self._start_proctor(name)
        ca = self.agent_dir / "proctor-ca.pem"
        shutil.copy(self.state("enforce") / "ca" / "mitmproxy-ca-cert.pem", ca)
        ca.chmod(0o644)
        (self.agent_dir / "client.py").write_text(CLIENT)

    def _network(self) -> None:
        a, u = self.agent_ns, self.up_ns
        for ns in (a, u):
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        va, vu = self.veth
        sh("ip", "link", "add", va, "type", "veth", "peer", "name", vu)
        sh("ip", "link", "set", va, "netns", a)
        sh("ip", "link", "set", vu, "netns", u)
        sh("ip", "-n", a, "addr", "add", f"{AGENT_IP}/24", "dev", va)
        sh("ip", "-n", u, "addr", "add", f"{ERP_IP}/24", "dev", vu)
        sh("ip", "-n", a, "link", "set", va, "up")
        sh("ip", "-n", u, "link", "set", vu, "up")
        # mounted over /etc/hosts and /etc/resolv.conf by `ip netns exec`: Proctor resolves erp.test here
        self.hosts_dir = Path("/etc/netns") / a
        self.hosts_dir.mkdir(parents=True, exist_ok=True)
        (self.hosts_dir / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n{ERP_IP} {ERP_HOST}\n")
        (self.hosts_dir / "resolv.conf").write_text("nameserver 10.77.0.53\n")  # unused: names come from hosts

    def _upstream(self) -> None:
        import trustme

        ca = trustme.CA()
        self.upstream_ca = self.base / "up" / "ca.pem"
        ca.cert_pem.write_to_path(str(self.upstream_ca))
        self.upstream_ca.chmod(0o644)
        cert = ca.issue_cert(ERP_HOST, ERP_IP)
        pem, key = self.base / "up" / "erp.pem", self.base / "up" / "erp.key"
        cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
        cert.private_key_pem.write_to_path(str(key))
        log = open(self.base / "up" / "upstream.log", "wb")
        self.upstream = subprocess.Popen(
            ["ip", "netns", "exec", self.up_ns, sys.executable, str(Path(__file__).resolve()), "--serve-upstream",
             ERP_IP, str(pem), str(key)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        want = {f"{ERP_IP}:{HTTP_PORT}", f"{ERP_IP}:{HTTPS_PORT}"}
        self._wait(lambda: want <= self._listening(self.up_ns), "the upstream", proc=self.upstream)

    def _proctor_files(self) -> None:
        import yaml
        from cryptography.hazmat.primitives.asymmetric import ec
        from jwt.algorithms import ECAlgorithm

        sys.path.insert(0, str(BENCH))
        import proctor_env

        p = self.pdir
        p.mkdir(mode=0o755)
        key = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
        jwk.update({"kid": proctor_env.KID, "use": "sig", "alg": "ES256"})
        (p / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
        # The same agent token for both modes: Proxy-Authorization in forward mode, the token file in transparent.
        self.token = proctor_env.make_token(key, ttl=6 * 3600)
        (p / "connectors").mkdir()
        (p / "connectors" / "erp.yaml").write_text(yaml.safe_dump({
            "name": "erp",
            "description": "benchmark upstream (bench/upstream.py)",
            "hosts": [f"{ERP_HOST}:{HTTP_PORT}", f"{ERP_HOST}:{HTTPS_PORT}"],
            "routes": [
                {"method": "GET", "path": "/items/{id}", "action": "bench.item.read",
                 "resource": {"type": "Item", "id": "{id}"}, "attributes": {"kind": "widget"}},
                {"method": "POST", "path": "/items", "action": "bench.item.create",
                 "resource": {"type": "Item", "id": "new"}, "attributes": {"kind": "widget"}},
            ],
        }, sort_keys=False))
        (p / "policies").mkdir()
        (p / "policies" / "bench.cedar").write_text(POLICIES)
        (p / "policies" / "schema.cedarschema").write_text(SCHEMA)
        ident = p / "identity"
        ident.mkdir(mode=0o700)
        (ident / "token").write_text(self.token + "\n")
        (ident / "token").chmod(0o400)
        for path in (ident, ident / "token"):
            os.chown(path, PROXY_UID, PROXY_UID)
        for name, ports in PROCS.items():
            cfg = proctor_env._config(f"state-{name}", ports["forward"], ports["control"])
            cfg["transparent"] = {"enabled": True, "port": ports["transparent"], "token_file": "identity/token",
                                  "tls_ports": [HTTPS_PORT]}
            cfg["upstream"] = {"ca_file": str(self.upstream_ca)}
            if name == "monitor":
                cfg["monitor"] = {"global": True}
            (p / f"proctor-{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
            self.state(name).mkdir(mode=0o700)
            os.chown(self.state(name), PROXY_UID, PROXY_UID)

    def _start_proctor(self, name: str) -> None:
        sys.path.insert(0, str(ROOT / "tests"))
        from support.transparent_netns import python_for

        log = open(self.base / f"proctor-{name}.log", "ab")
        argv = ["ip", "netns", "exec", self.agent_ns, "setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}",
                "--clear-groups", *python_for(PROXY_UID), "-m", "proxy.cli", "run", "-c", f"proctor-{name}.yaml",
                "--log-level", "warning"]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.pdir), "PYTHONUNBUFFERED": "1",
               "LANG": "C.UTF-8"}
        proc = subprocess.Popen(argv, cwd=str(self.pdir), stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.proctors[name] = proc
        self._wait(lambda: self.control(name, "/readyz")[0] == 200, f"proctor ({name}) readiness", timeout=90,
                   proc=proc, log=self.base / f"proctor-{name}.log")
        # `ip netns exec` and setpriv exec what they run: the pid is Proctor's own.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        if b"proxy.cli" not in cmdline:
            raise RuntimeError(f"pid {proc.pid} is not proctor: {cmdline!r}")

    def control(self, name: str, path: str) -> tuple[int, Any]:
        done = sh("ip", "netns", "exec", self.agent_ns, "curl", "-s", "-m", "5", "-w", "\n%{http_code}",
                  f"http://127.0.0.1:{PROCS[name]['control']}{path}", check=False)
        body, _, code = done.stdout.rpartition("\n")
        try:
            return int(code), json.loads(body) if body else None
        except ValueError:
            return 0, None

    @staticmethod
    def _listening(ns: str) -> set[str]:
        out = sh("ip", "netns", "exec", ns, "ss", "-ltnH", check=False).stdout
        return {line.split()[3] for line in out.splitlines() if len(line.split()) > 3}

    @staticmethod
    def _wait(pred: Any, what: str, timeout: float = 30, proc: subprocess.Popen[bytes] | None = None,
              log: Path | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if proc is not None and proc.poll() is not None:
                tail = log.read_text()[-3000:] if log and log.exists() else ""
                raise RuntimeError(f"{what}: the process exited with {proc.returncode}\n{tail}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.1)

    # -- the agent
    def client(self, sc: Scenario, **extra: Any) -> subprocess.Popen[bytes]:
        args = {"mode": sc.mode, "tls": sc.tls, "method": sc.method, "path": sc.path,
                "body": POST_BODY if sc.method == "POST" else "", "host": ERP_HOST, "ip": ERP_IP,
                "port": HTTPS_PORT if sc.tls else HTTP_PORT, "proxy_port": PROCS[sc.proc]["forward"],
                "token": self.token, "ca": str(self.agent_dir / "proctor-ca.pem"), **extra}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self.agent_dir), "LANG": "C.UTF-8"}
        py = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
        if not Path(py).exists():
            py = "/usr/bin/python3"
        argv = ["ip", "netns", "exec", self.agent_ns, "setpriv", f"--reuid={AGENT_UID}", f"--regid={AGENT_UID}",
                "--clear-groups", py, "-S", str(self.agent_dir / "client.py"), json.dumps(args)]
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, cwd=str(self.agent_dir))

    def decision(self, name: str, decision_id: str, timeout: float = 5.0) -> dict[str, Any]:
        path = self.state(name) / "decisions.jsonl"
        deadline = time.monotonic() + timeout
        while True:
            if path.exists():
                for line in path.read_text().splitlines():
                    if decision_id in line:
                        rec = json.loads(line)
                        if rec.get("decision_id") == decision_id and "type" not in rec:
                            return rec
            if time.monotonic() > deadline:
                raise AssertionError(f"decision {decision_id} not recorded by {name}")
            time.sleep(0.05)

    def decisions_written(self, name: str) -> int:
        path = self.state(name) / "decisions.jsonl"
        if not path.exists():
            return 0
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return sum(1 for rec in lines if "type" not in rec and rec.get("decision_id"))

    # -- teardown
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for proc in self.proctors.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.proctors.values(), *([self.upstream] if self.upstream else [])]:
            if proc is self.upstream and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        for ns in self.made:
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)  # its veth end and its rules go with it
        sh("ip", "link", "del", self.veth[0], check=False)  # (left in the root namespace if a move failed)
        if self.hosts_dir is not None:
            shutil.rmtree(self.hosts_dir, ignore_errors=True)
        shutil.rmtree(self.base, ignore_errors=True)


# ------------------------------------------------------------------ measuring
def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads, not its children), in seconds (as bench/run.py)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """user+nice+system CPU-seconds of the whole machine (/proc/stat; irq and softirq left out)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    return (vals[0] + vals[1] + vals[2]) / os.sysconf("SC_CLK_TCK")


class Lines:
    """Lines from a child's stdout, with a timeout (the child is bounded, this makes sure)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc, self.buf = proc, b""

    def next(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the load generator did not answer in time")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                    raise RuntimeError(f"the load generator ended: {err[-3000:]}")
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)


@dataclass
class Phase:
    scenario: str
    phase: str  # latency (1 connection) | load (--connections)
    repeat: int
    connections: int
    requests: int
    seconds: float
    statuses: dict[str, int]
    unexpected: int
    cpu_us_per_req: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    other_cores: float  # machine CPU outside Proctor, the client and the upstream, as average cores


def pct(sorted_vals: list[int], q: float) -> float:
    i = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[i] / 1000


def run_scenario(b: Bench, sc: Scenario, repeat: int, a: argparse.Namespace) -> tuple[list[Phase], int]:
    proctor = b.proctors[sc.proc].pid
    up = b.upstream.pid if b.upstream else None
    client = b.client(sc, connections=a.connections, requests=a.requests, latency_requests=a.latency_requests,
                      warmup=a.warmup, max_seconds=a.max_seconds)
    lines = Lines(client)
    out: list[Phase] = []
    try:
        for _ in range(2):
            ready = lines.next(timeout=60)
            name = ready["ready"]

            def own() -> float:
                return sum(proc_cpu_seconds(p) for p in (proctor, client.pid, up) if p is not None)

            c0, own0, m0 = proc_cpu_seconds(proctor), own(), machine_busy_seconds()
            assert client.stdin is not None
            client.stdin.write(b"go\n")
            client.stdin.flush()
            res = lines.next(timeout=a.max_seconds + 30)
            c1, own1, m1 = proc_cpu_seconds(proctor), own(), machine_busy_seconds()
            lat = sorted(res["lat_us"])
            n = len(lat)
            if n == 0:
                raise RuntimeError(f"{sc.name}: no request answered in the {name} phase")
            statuses = {str(k): v for k, v in res["statuses"].items()}
            unexpected = sum(v for k, v in statuses.items() if int(k) != sc.expect)
            secs = res["seconds"]
            out.append(Phase(sc.name, name, repeat, 1 if name == "latency" else a.connections, n, round(secs, 3),
                             statuses, unexpected, round((c1 - c0) / n * 1e6, 1), round(n / secs, 1),
                             pct(lat, 0.50), pct(lat, 0.90), pct(lat, 0.99),
                             round(max(0.0, (m1 - m0) - (own1 - own0)) / secs, 2)))
        done = lines.next(timeout=30)
        client.wait(30)
        return out, int(done["sent"])
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(5)


def probe(b: Bench, sc: Scenario) -> tuple[int, dict[str, str]]:
    client = b.client(sc, probe=True, max_seconds=10)
    try:
        res = Lines(client).next(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
        client.wait(5)
    return int(res["status"]), res["headers"]


def preflight(b: Bench) -> list[str]:
    """Each scenario, once: the status, the decision record and (monitored) the header, before measuring."""
    notes = []
    for sc in SCENARIOS:
        status, headers = probe(b, sc)
        if status != sc.expect:
            raise AssertionError(f"{sc.name}: {sc.method} {sc.path} -> {status}, expected {sc.expect}: {headers}")
        did = headers.get("x-proctor-decision-id")
        if not did:
            raise AssertionError(f"{sc.name}: no X-Proctor-Decision-Id: {headers}")
        rec = b.decision(sc.proc, did)
        want_mode = "transparent" if sc.mode == "transparent" else "forward"
        want_decision = "deny" if sc.expect == 403 or sc.monitored else "allow"  # (monitored: what it would be)
        got = (rec.get("mode"), rec.get("agent"), rec.get("decision"), bool(rec.get("monitor")))
        if got != (want_mode, "bench-agent", want_decision, sc.proc == "monitor"):
            raise AssertionError(f"{sc.name}: recorded {got}: {rec}")
        monitored = rec.get("monitored")
        mon_header = headers.get("proctor-monitor", "")
        if sc.monitored:
            if not (mon_header.startswith("deny") and monitored and monitored.get("forwarded") is True
                    and monitored.get("decision") == "deny"):
                raise AssertionError(f"{sc.name}: not monitored as a forwarded deny: {mon_header!r} {monitored}")
        elif mon_header or monitored:
            raise AssertionError(f"{sc.name}: unexpectedly monitored: {mon_header!r} {monitored}")
        note = (f"{sc.name}: {sc.method} {sc.path} -> {status}, recorded mode {want_mode}, agent bench-agent, "
                f"decision {want_decision}")
        if sc.monitored:
            note += f", Proctor-Monitor: {mon_header}, monitored.forwarded true"
        if sc.expect == 403:
            note += f" ({', '.join(rec.get('reasons') or [])})"
        notes.append(note)
        print("preflight", note, flush=True)
    return notes


# ------------------------------------------------------------------ summarising
def med(vals: list[float]) -> float:
    return statistics.median(vals)


def cell(vals: list[float], nd: int = 0) -> str:
    f = (lambda v: f"{v:,.{nd}f}")
    if len(vals) == 1:
        return f(vals[0])
    return f"{f(med(vals))} ({f(min(vals))}–{f(max(vals))})"


def phases(res: dict[str, Any], scenario: str, phase: str) -> list[dict[str, Any]]:
    return [p for p in res["phases"] if p["scenario"] == scenario and p["phase"] == phase]


def paired(res: dict[str, Any], x: str, y: str, key: str, how: str = "diff") -> list[float]:
    out = []
    for r in sorted({p["repeat"] for p in res["phases"]}):
        px = [p for p in phases(res, x, "load") if p["repeat"] == r]
        py = [p for p in phases(res, y, "load") if p["repeat"] == r]
        if px and py:
            out.append(px[0][key] - py[0][key] if how == "diff" else px[0][key] / py[0][key])
    return out


def row(res: dict[str, Any], name: str, label: str) -> str:
    load, lat = phases(res, name, "load"), phases(res, name, "latency")
    unexpected = sum(p["unexpected"] for p in load + lat)
    return (f"| {label} | {BY_NAME[name].expect} | {cell([p['rps'] for p in load])} | "
            f"{cell([p['cpu_us_per_req'] for p in load])} | "
            f"{med([p['p50_ms'] for p in load]):.2f} / {med([p['p99_ms'] for p in load]):.2f} | "
            f"{med([p['p50_ms'] for p in lat]):.2f} / {med([p['p99_ms'] for p in lat]):.2f} | "
            f"{cell([p['cpu_us_per_req'] for p in lat])} | {unexpected} |")


def render(res: dict[str, Any]) -> str:
    a = res["args"]
    c = a["connections"]
    head = (f"| request | status | req/s ({c} conns) | Proctor CPU µs/req ({c} conns) | p50 / p99 ms ({c} conns) "
            f"| p50 / p99 ms (1 conn) | Proctor CPU µs/req (1 conn) | other statuses |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|")
    names = {s.name for s in SCENARIOS} & {p["scenario"] for p in res["phases"]}
    out = ["**Forward proxy vs transparent** (the enforcing process; medians over repeats, min–max in "
           "parentheses):", "", head]
    for sc in SCENARIOS[:8]:
        if sc.name in names:
            out.append(row(res, sc.name, sc.label))
    out += ["", "Transparent minus forward proxy, per repeat paired (load phase; median, range):", ""]
    for method in ("GET", "POST"):
        for tls, scheme in ((False, "http://"), (True, "https://")):
            sfx = f"{'https' if tls else 'http'}-{method.lower()}"
            if f"fwd-{sfx}" in names and f"tp-{sfx}" in names:
                d = paired(res, f"tp-{sfx}", f"fwd-{sfx}", "cpu_us_per_req")
                q = paired(res, f"tp-{sfx}", f"fwd-{sfx}", "rps", "ratio")
                out.append(f"- {method} {scheme}: CPU {med(d):+,.0f} µs/req ({min(d):+,.0f} … {max(d):+,.0f}); "
                           f"throughput ×{med(q):.2f} (×{min(q):.2f} … ×{max(q):.2f})")
    out += ["", "**Monitor mode** (forward-proxy http, GET; `monitor off` is the enforcing process, `monitor on` "
            "the one with `monitor: {global: true}`):", "", head]
    for name, label in MONITOR_ROWS:
        if name in names:
            out.append(row(res, name, label or BY_NAME[name].label))
    out += ["", "Differences, per repeat paired (load phase; median, range):", ""]
    for x, y, what in (("monitor-deny", "fwd-http-get", "monitored deny (forwarded) − allowed GET, monitor off"),
                       ("monitor-deny", "monitor-allow",
                        "monitored deny (forwarded) − allowed GET, both monitor on (one process)"),
                       ("monitor-allow", "fwd-http-get", "allowed GET, monitor on − monitor off"),
                       ("monitor-deny", "enforce-deny", "monitored deny (forwarded) − the same deny enforced (403)")):
        if x in names and y in names:
            d = paired(res, x, y, "cpu_us_per_req")
            q = paired(res, x, y, "rps", "ratio")
            out.append(f"- {what}: CPU {med(d):+,.0f} µs/req ({min(d):+,.0f} … {max(d):+,.0f}); "
                       f"throughput ×{med(q):.2f} (×{min(q):.2f} … ×{max(q):.2f})")
    other = [p["other_cores"] for p in res["phases"]]
    out += ["", f"Other processes during the phases: median {med(other):.2f} cores, max {max(other):.2f} "
            "(machine CPU outside Proctor, the load generator and the upstream).",
            f"Load average before / after: {' '.join(res['loadavg_before'])} / {' '.join(res['loadavg_after'])}.",
            f"Decision records written: {res['records']} for {res['sent']} requests sent (warm-up, pre-flight and "
            "measured)."]
    return "\n".join(out) + "\n"


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000, help="requests per scenario and repeat, load phase")
    ap.add_argument("--latency-requests", type=int, default=300,
                    help="requests per scenario and repeat, one connection (latency)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--connections", type=int, default=4, help="keep-alive connections in the load phase")
    ap.add_argument("--warmup", type=int, default=20, help="requests per connection before the measured phases")
    ap.add_argument("--max-seconds", type=float, default=20.0, help="bound on each measured phase")
    ap.add_argument("--backend", choices=["iptables", "nftables"], default="iptables", help="proctor netsetup's")
    ap.add_argument("--only", default="", help="comma-separated scenario names (default: all): "
                    + ", ".join(s.name for s in SCENARIOS))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy the Proctor and upstream logs here at the end")
    ap.add_argument("--render", type=Path, metavar="JSON", help="only print the markdown of a saved --json run")
    ap.add_argument("--serve-upstream", nargs=3, metavar=("HOST", "CERT", "KEY"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.serve_upstream:
        serve_upstream(*a.serve_upstream)
        return 0
    if a.render:
        print(render(json.loads(a.render.read_text())), end="")
        return 0
    if (why := why_not()) is not None:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    chosen = [s for s in SCENARIOS if not a.only or s.name in a.only.split(",")]
    if a.only and (unknown := set(a.only.split(",")) - set(BY_NAME)):
        ap.error(f"unknown scenarios: {', '.join(sorted(unknown))}")

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)

    sys.path.insert(0, str(BENCH))
    from run import machine_info

    started = time.time()
    res: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                           "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
                           "machine": machine_info(), "loadavg_before": loadavg(), "phases": []}
    b = Bench(a.backend)
    try:
        b.build()
        res["preflight"] = preflight(b)
        sent = len(SCENARIOS)  # the pre-flight's probes, one request each
        for r in range(1, a.repeats + 1):
            order = chosen if r % 2 else list(reversed(chosen))
            for sc in order:
                ps, n = run_scenario(b, sc, r, a)
                sent += n
                res["phases"] += [asdict(p) for p in ps]
                lat, load = ps
                print(f"repeat {r} {sc.name:15} {load.rps:7.0f} req/s  {load.cpu_us_per_req:7.0f} µs CPU/req  "
                      f"p50 {load.p50_ms:.2f} p99 {load.p99_ms:.2f} ms | 1 conn p50 {lat.p50_ms:.2f} "
                      f"p99 {lat.p99_ms:.2f} ms  statuses {load.statuses}  other {load.other_cores:.2f}",
                      flush=True)
        time.sleep(1.0)  # the last decision lines are written after the answers
        res["sent"] = sent
        res["records"] = sum(b.decisions_written(name) for name in PROCS)
        res["loadavg_after"] = loadavg()
        res["elapsed_s"] = round(time.time() - started, 1)
        print()
        print(render(res))
        print(f"elapsed {res['elapsed_s']} s")
        if a.json:
            a.json.write_text(json.dumps(res, indent=1))
    except BaseException:
        for log in sorted(b.base.glob("proctor-*.log")):
            print(f"--- {log.name} (tail)\n{log.read_text(errors='replace')[-2000:]}", file=sys.stderr)
        raise
    finally:
        if a.keep_logs:
            a.keep_logs.mkdir(parents=True, exist_ok=True)
            for log in [*b.base.glob("proctor-*.log"), *b.base.glob("up/*.log")]:
                shutil.copy(log, a.keep_logs / log.name)
        b.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
