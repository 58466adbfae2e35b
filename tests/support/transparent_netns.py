"""A transparent sidecar in network namespaces, for tests/test_transparent_netns.py.

Two throwaway namespaces joined by a veth pair:

- "up": the rest of the world, no rules. The ERP (`erp.test`, 10.88.0.1) answers
  HTTP on 8080 and HTTPS on 8443 (a recording echo server), a raw TCP service on
  2222 and UDP on 5353 record whatever reaches them, and an attacker
  (10.88.0.3) runs the same HTTP/HTTPS servers with a certificate for
  `erp.test` from the same CA. IPv6: fd88::1 answers on 8080.
- "agent": the pod. Proctor runs here as PROXY_UID, the agent's clients as
  AGENT_UID with no proxy variable at all, and `proctor netsetup --apply`
  writes the redirect (every TCP connection but Proctor's uid to the
  transparent port 15001, nothing else out but DNS).

Names resolve from /etc/netns/<agent>/hosts (`ip netns exec` mounts it over
/etc/hosts), so Proctor and the agent see the same `erp.test`. The paths live in
a world-readable directory of their own (pytest's are private to root), the
state and the token file are Proctor's uid's alone.

Everything is removed by `close()`: processes, namespaces (with their veths and
rules), the hosts file and the directory. The addresses and ports are private to
the two namespaces, so fixed values cannot collide with other tests.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
import yaml

SUPPORT = Path(__file__).resolve().parent
ROOT = SUPPORT.parent.parent

PROXY_UID, AGENT_UID = 1337, 10001
TRANSPARENT_PORT, FORWARD_PORT, CONTROL_PORT = 15001, 8080, 8081
ERP_IP, ATTACKER_IP, AGENT_IP = "10.88.0.1", "10.88.0.3", "10.88.0.2"
ERP6, AGENT6 = "fd88::1", "fd88::2"
HTTP_PORT, HTTPS_PORT, RAW_PORT, UDP_PORT = 8080, 8443, 2222, 5353
# A port of the ERP's the connector covers that mitmproxy, by the number alone, would take for DNS
# (53 and 5353): no server listens there unless a test starts one.
ERP_DNS_PORT = 5353
ERP_KEY = "erp-secret-injected-by-proctor"


def why_no_netns() -> str | None:
    """Why network namespaces cannot be built here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    for tool in ("ip", "setpriv", "iptables-restore", "nft", "curl", "ss"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 util-linux iptables nftables curl)"
    if not Path("/usr/bin/node").exists() and shutil.which("node") is None:
        return "node is not installed"
    name = f"ptrprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here (ip netns add: {made.stderr.strip()})"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def sh(*argv: str, check: bool = True, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def python_for(uid: int) -> list[str]:
    """A command prefix that runs this venv's Python code as `uid`. The venv's interpreter may
    live where another uid cannot go (pyenv under /root): then the system interpreter of the
    same version, without its own site-packages, with the venv's added (the bootstrap below)."""
    # (through `env`: setpriv itself may still exec with root's capabilities, its child may not)
    probe = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "env"]
    check = "import os, sys; os.stat(sys.executable); import json"
    if subprocess.run([*probe, sys.executable, "-c", check], capture_output=True).returncode == 0:
        return [sys.executable]
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        if subprocess.run([*probe, candidate, "-S", "-c", check], capture_output=True).returncode == 0:
            return [candidate, "-S", str(SUPPORT / "venv_boot.py"), sysconfig.get_paths()["purelib"]]
    raise RuntimeError(f"no {version} interpreter that uid {uid} can run")


# The agent's clients: each takes one JSON argument and prints one JSON line.
NODE_FETCH = r"""
const a = JSON.parse(process.argv[2]);
(async () => {
  try {
    const r = await fetch(a.url, {method: a.method || "GET", headers: a.headers || {}, body: a.body});
    const body = await r.text();
    console.log(JSON.stringify({status: r.status, headers: Object.fromEntries(r.headers), body}));
  } catch (e) {
    console.log(JSON.stringify({error: String(e), cause: String(e.cause || "")}));
  }
})();
"""

AIOHTTP_CLIENT = r"""
import asyncio, json, ssl, sys
import aiohttp  # from the venv (venv_boot.py adds it when run by the system interpreter)
a = json.loads(sys.argv[1])
async def main():
    ctx = ssl.create_default_context(cafile=a["ca"]) if a.get("ca") else None
    try:
        # trust_env is False (aiohttp's default): proxy variables would be ignored anyway
        async with aiohttp.ClientSession() as s:
            async with s.request(a.get("method", "GET"), a["url"], headers=a.get("headers") or {},
                                 data=a.get("body"), ssl=ctx if ctx is not None else True,
                                 timeout=aiohttp.ClientTimeout(total=20)) as r:
                body = await r.text()
                print(json.dumps({"status": r.status, "headers": {k.lower(): v for k, v in r.headers.items()},
                                  "body": body}))
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
asyncio.run(main())
"""

# Raw TCP and UDP services: every connection, its bytes and every datagram, one JSON line each.
RAW_SERVERS = r"""
import json, socket, sys, threading
host, tcp_port, udp_port, log_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
log = open(log_path, "a", buffering=1)
lock = threading.Lock()
def note(**e):
    with lock:
        log.write(json.dumps(e) + "\n")
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, tcp_port)); s.listen(64)
    while True:
        conn, peer = s.accept()
        def serve(conn=conn, peer=peer):
            conn.settimeout(3)
            data = b""
            try:
                conn.sendall(b"RAW-SERVICE-BANNER\r\n")
                data = conn.recv(65536)
            except OSError:
                pass
            note(kind="tcp", peer=peer[0], data=data.decode("latin-1"))
            conn.close()
        threading.Thread(target=serve, daemon=True).start()
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((host, udp_port))
    while True:
        data, peer = s.recvfrom(65536)
        note(kind="udp", peer=peer[0], data=data.decode("latin-1"))
threading.Thread(target=tcp, daemon=True).start()
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


@dataclass
class Reply:
    status: int | None
    headers: dict[str, str]
    body: str
    error: str | None = None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Netns:
    backend: str
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="proctor-transparent-", dir="/tmp")))
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    proctor: subprocess.Popen[bytes] | None = None
    made: list[str] = field(default_factory=list)  # namespaces created
    hosts_dir: Path | None = None

    # -- names and paths -------------------------------------------------------------
    @property
    def agent_ns(self) -> str:
        return f"ptra{self.tag}"

    @property
    def up_ns(self) -> str:
        return f"ptru{self.tag}"

    @property
    def pdir(self) -> Path:
        return self.base / "proctor"

    @property
    def token_dir(self) -> Path:
        return self.pdir / "identity"

    @property
    def token_file(self) -> Path:
        return self.token_dir / "token"

    @property
    def state(self) -> Path:
        return self.pdir / "state"

    @property
    def agent_dir(self) -> Path:
        return self.base / "agent"

    @property
    def proctor_ca(self) -> Path:
        return self.agent_dir / "proctor-ca.pem"

    def upstream_log(self, name: str) -> Path:
        return self.base / "up" / f"{name}.jsonl"

    def received(self, name: str) -> list[dict[str, Any]]:
        p = self.upstream_log(name)
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def clear_logs(self) -> None:
        for p in (self.base / "up").glob("*.jsonl"):
            p.write_text("")

    def decisions(self) -> list[dict[str, Any]]:
        p = self.state / "decisions.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def decision(self, decision_id: str, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for rec in self.decisions():
                if rec.get("decision_id") == decision_id and "type" not in rec:
                    return rec
            if time.monotonic() > deadline:
                raise AssertionError(f"decision {decision_id} not recorded")
            time.sleep(0.05)

    def log(self) -> str:
        p = self.base / "proctor.log"
        return p.read_text() if p.exists() else ""

    # -- building --------------------------------------------------------------------
    def build(self, idp: Any, token: str, *, policies: Path, token_check_seconds: float = 0.2,
              config: dict[str, Any] | None = None) -> None:
        """`config`: top-level keys added to (or replacing those of) the generated proctor.yaml."""
        self.base.chmod(0o755)
        for d in ("up", "agent"):
            (self.base / d).mkdir(mode=0o755)
        self._network()
        self._upstreams()
        self._proctor_files(idp, token, policies, token_check_seconds, config or {})
        self.netsetup()
        self.start_proctor()
        shutil.copy(self.state / "ca" / "mitmproxy-ca-cert.pem", self.proctor_ca)
        self.proctor_ca.chmod(0o644)
        (self.agent_dir / "fetch.mjs").write_text(NODE_FETCH)
        (self.agent_dir / "aio.py").write_text(AIOHTTP_CLIENT)

    def _network(self) -> None:
        a, u = self.agent_ns, self.up_ns
        for ns in (a, u):
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        va, vu = f"pva{self.tag}", f"pvu{self.tag}"
        sh("ip", "link", "add", va, "type", "veth", "peer", "name", vu)
        sh("ip", "link", "set", va, "netns", a)
        sh("ip", "link", "set", vu, "netns", u)
        sh("ip", "-n", a, "addr", "add", f"{AGENT_IP}/24", "dev", va)
        sh("ip", "-n", a, "addr", "add", f"{AGENT6}/64", "dev", va, "nodad")
        for addr in (ERP_IP, ATTACKER_IP):
            sh("ip", "-n", u, "addr", "add", f"{addr}/24", "dev", vu)
        sh("ip", "-n", u, "addr", "add", f"{ERP6}/64", "dev", vu, "nodad")
        sh("ip", "-n", a, "link", "set", va, "up")
        sh("ip", "-n", u, "link", "set", vu, "up")
        # /etc/netns/<name>/hosts is mounted over /etc/hosts by `ip netns exec`
        self.hosts_dir = Path("/etc/netns") / a
        self.hosts_dir.mkdir(parents=True, exist_ok=True)
        (self.hosts_dir / "hosts").write_text(
            f"127.0.0.1 localhost\n::1 localhost\n{ERP_IP} erp.test\n{ATTACKER_IP} attacker.test\n")
        (self.hosts_dir / "resolv.conf").write_text("nameserver 10.88.0.53\n")  # unreachable: names come from hosts

    def _upstreams(self) -> None:
        ca = trustme.CA()
        self.upstream_ca = self.base / "up" / "ca.pem"
        ca.cert_pem.write_to_path(str(self.upstream_ca))
        self.upstream_ca.chmod(0o644)
        for name, ip in (("erp", ERP_IP), ("attacker", ATTACKER_IP)):
            cert = ca.issue_cert("erp.test", ip)  # the attacker's is as good as the ERP's
            pem, key = self.base / "up" / f"{name}.pem", self.base / "up" / f"{name}.key"
            cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
            cert.private_key_pem.write_to_path(str(key))
            self._in_up([sys.executable, str(SUPPORT / "echo_server.py"), "--host", ip, "--port", str(HTTP_PORT),
                         "--log", str(self.upstream_log(f"{name}-http"))])
            self._in_up([sys.executable, str(SUPPORT / "echo_server.py"), "--host", ip, "--port", str(HTTPS_PORT),
                         "--log", str(self.upstream_log(f"{name}-https")), "--cert", str(pem), "--key", str(key)])
        self._in_up([sys.executable, str(SUPPORT / "echo_server.py"), "--host", ERP6, "--port", str(HTTP_PORT),
                     "--log", str(self.upstream_log("erp6-http"))])
        raw = self.base / "up" / "raw.py"
        raw.write_text(RAW_SERVERS)
        self._in_up([sys.executable, str(raw), ERP_IP, str(RAW_PORT), str(UDP_PORT), str(self.upstream_log("raw"))],
                    stdin=subprocess.PIPE)
        want = {f"{ip}:{port}" for ip in (ERP_IP, ATTACKER_IP) for port in (HTTP_PORT, HTTPS_PORT)}
        want |= {f"[{ERP6}]:{HTTP_PORT}", f"{ERP_IP}:{RAW_PORT}"}
        self._wait(lambda: want <= self._listening(self.up_ns), "the upstream servers")

    def _in_up(self, argv: list[str], **kw: Any) -> None:
        self.procs.append(subprocess.Popen(["ip", "netns", "exec", self.up_ns, *argv], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, **kw))

    @staticmethod
    def _listening(ns: str) -> set[str]:
        out = sh("ip", "netns", "exec", ns, "ss", "-ltnH", check=False).stdout
        return {line.split()[3] for line in out.splitlines() if len(line.split()) > 3}

    @staticmethod
    def _wait(predicate: Any, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def _proctor_files(self, idp: Any, token: str, policies: Path, token_check_seconds: float,
                       extra: dict[str, Any]) -> None:
        p = self.pdir
        p.mkdir(mode=0o755)
        shutil.copytree(policies, p / "policies")
        shutil.copy(idp.jwks_path, p / "jwks.json")
        (p / "secrets").mkdir(mode=0o700)
        (p / "secrets" / "erp-key").write_text(ERP_KEY)
        (p / "connectors").mkdir()
        items = [("GET", "/items/{id}", "test.item.read", "{id}"), ("POST", "/items", "test.item.create", "new"),
                 ("DELETE", "/items/{id}", "test.item.delete", "{id}")]
        (p / "connectors" / "erp.yaml").write_text(yaml.safe_dump({
            "name": "erp",
            "description": "the ERP the agent may use",
            "hosts": [f"erp.test:{HTTP_PORT}", f"erp.test:{HTTPS_PORT}", f"{ERP_IP}:{HTTP_PORT}",
                      f"{ERP_IP}:{HTTPS_PORT}", f"erp.test:{ERP_DNS_PORT}"],
            "auth": {"type": "api_key", "header": "X-Erp-Key", "value": {"file": str(p / "secrets" / "erp-key")}},
            "routes": [{"method": m, "path": path, "action": act, "resource": {"type": "Item", "id": rid},
                        "attributes": {"kind": "widget"}} for m, path, act, rid in items],
        }))
        self.token_dir.mkdir(mode=0o700)
        self.write_token(token)
        self.state.mkdir(mode=0o700)
        config = {
            "state_dir": "state",
            "listen": {"host": "127.0.0.1", "port": FORWARD_PORT},
            "control": {"listen": {"host": "127.0.0.1", "port": CONTROL_PORT}},
            "transparent": {"enabled": True, "port": TRANSPARENT_PORT, "token_file": "identity/token",
                            "token_check_seconds": token_check_seconds, "tls_ports": [443, HTTPS_PORT]},
            "identity": {
                "issuers": [{"issuer": idp.issuer, "audience": idp.audience, "jwks_file": "jwks.json",
                             "algorithms": ["RS256", "ES256"]}],
                "principal": {"attributes": {"team": "team"}, "groups_claim": "groups"},
            },
            "dev_issuer": {"enabled": False},
            "connectors_dir": "connectors",
            "policies": {"dir": "policies"},
            "upstream": {"ca_file": str(self.upstream_ca)},
            **extra,
        }
        (p / "proctor.yaml").write_text(yaml.safe_dump(config))
        for path in (p / "secrets", p / "secrets" / "erp-key", self.state):
            os.chown(path, PROXY_UID, PROXY_UID)

    def write_token(self, token: str) -> None:
        """Replace the token file as a secret volume would (a new file renamed over the old one)."""
        tmp = self.token_dir / f".token.{secrets.token_hex(4)}"
        tmp.write_text(token + "\n")
        os.chown(tmp, PROXY_UID, PROXY_UID)
        tmp.chmod(0o400)
        os.chown(self.token_dir, PROXY_UID, PROXY_UID)
        if self.token_file.is_symlink() or self.token_file.is_dir():
            self.token_file.unlink()
        tmp.rename(self.token_file)

    def write_token_kubernetes_style(self, token: str) -> None:
        """The kubelet's atomic writer: token -> ..data/token, ..data -> ..<timestamp>/, and a
        rotation swaps the ..data symlink (rename over it), then removes the old directory."""
        stamp = self.token_dir / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{secrets.token_hex(4)}"
        stamp.mkdir()
        (stamp / "token").write_text(token)
        for path in (stamp, stamp / "token"):
            os.chown(path, PROXY_UID, PROXY_UID)
        data = self.token_dir / "..data"
        old = data.resolve() if data.is_symlink() else None
        tmp_link = self.token_dir / "..data_tmp"
        tmp_link.symlink_to(stamp.name)
        tmp_link.rename(data)
        if not self.token_file.is_symlink():
            if self.token_file.exists():
                self.token_file.unlink()
            self.token_file.symlink_to("..data/token")
        if old is not None and old != stamp:
            shutil.rmtree(old)

    def netsetup(self, *extra: str) -> None:
        """The redirect, by `proctor netsetup` itself (docs/deployment.md, netsetup reference); its
        defaults refuse the agent Proctor's forward (8080) and control (8081) ports."""
        sh(sys.executable, "-m", "proxy.cli", "netsetup", "--apply", "--backend", self.backend,
           "--netns", self.agent_ns, "--proxy-uid", str(PROXY_UID), "--proxy-port", str(TRANSPARENT_PORT),
           *extra, cwd=str(ROOT))

    def start_proctor(self, wait: bool = True) -> None:
        log = open(self.base / "proctor.log", "ab")
        argv = ["ip", "netns", "exec", self.agent_ns, "setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}",
                "--clear-groups", *python_for(PROXY_UID), "-m", "proxy.cli", "run", "-c", "proctor.yaml"]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.pdir), "PYTHONUNBUFFERED": "1",
               "LANG": "C.UTF-8"}
        self.proctor = subprocess.Popen(argv, cwd=str(self.pdir), stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        if wait:
            self._wait(self._ready, "proctor readiness in the agent namespace")

    def _ready(self) -> bool:
        assert self.proctor is not None
        if self.proctor.poll() is not None:
            raise RuntimeError(f"proctor exited with {self.proctor.returncode}:\n{self.log()}")
        return self.control("/readyz")[0] == 200

    def stop_proctor(self) -> None:
        if self.proctor is not None and self.proctor.poll() is None:
            self.proctor.send_signal(signal.SIGTERM)
            try:
                self.proctor.wait(15)
            except subprocess.TimeoutExpired:
                self.proctor.kill()
                self.proctor.wait(5)

    def control(self, path: str) -> tuple[int, Any]:
        """GET on Proctor's control API, from inside the agent namespace as Proctor's uid (an operator
        in Proctor's container: the rules refuse the control port to every other uid)."""
        done = sh("ip", "netns", "exec", self.agent_ns, "setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}",
                  "--clear-groups", "curl", "-s", "-m", "5", "-w", "\n%{http_code}",
                  f"http://127.0.0.1:{CONTROL_PORT}{path}", check=False)
        body, _, code = done.stdout.rpartition("\n")
        try:
            return int(code), json.loads(body) if body else None
        except ValueError:
            return 0, None

    def operator(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`proctor ARGS...` as an operator in Proctor's container (Proctor's uid, in the agent
        namespace: the only uid the rules let reach the control API)."""
        return self.as_agent([*python_for(PROXY_UID), "-m", "proxy.cli", *args], env=env, uid=PROXY_UID)

    # -- running the agent -----------------------------------------------------------
    def as_agent(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 40,
                 uid: int = AGENT_UID) -> subprocess.CompletedProcess[str]:
        """A command as the agent: its uid, no capability, no proxy variable (a clean environment)."""
        clean = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self.agent_dir), "LANG": "C.UTF-8",
                 **(env or {})}
        return sh("ip", "netns", "exec", self.agent_ns, "setpriv", f"--reuid={uid}", f"--regid={uid}",
                  "--clear-groups", "env", "-i", *[f"{k}={v}" for k, v in clean.items()], *argv,
                  check=False, timeout=timeout, cwd=str(self.agent_dir))

    def node(self, url: str, method: str = "GET", headers: dict[str, str] | None = None, body: str | None = None,
             ca: bool = False) -> Reply:
        env = {"NODE_EXTRA_CA_CERTS": str(self.proctor_ca)} if ca else {}
        args = json.dumps({"url": url, "method": method, "headers": headers or {}, "body": body})
        return self._reply(self.as_agent(["/usr/bin/node", str(self.agent_dir / "fetch.mjs"), args], env))

    def aiohttp(self, url: str, method: str = "GET", headers: dict[str, str] | None = None,
                body: str | None = None, ca: bool = False) -> Reply:
        args = json.dumps({"url": url, "method": method, "headers": headers or {}, "body": body,
                           "ca": str(self.proctor_ca) if ca else None})
        return self._reply(self.as_agent([*python_for(AGENT_UID), str(self.agent_dir / "aio.py"), args]))

    def curl(self, url: str, *extra: str, method: str = "GET", ca: bool = False, uid: int = AGENT_UID) -> Reply:
        argv = ["curl", "-sS", "-m", "20", "-X", method, "-D", "-", "-o", "-", *extra]
        if ca:
            argv += ["--cacert", str(self.proctor_ca)]
        done = self.as_agent([*argv, url], uid=uid)
        if done.returncode != 0:
            return Reply(None, {}, done.stdout, error=done.stderr.strip() or f"curl exit {done.returncode}")
        head, _, body = done.stdout.partition("\n\n")  # (text mode: CRLF arrives as LF)
        lines = head.split("\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return Reply(int(lines[0].split()[1]), headers, body)

    @staticmethod
    def _reply(done: subprocess.CompletedProcess[str]) -> Reply:
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if not lines:
            return Reply(None, {}, "", error=f"exit {done.returncode}: {done.stderr.strip()[-2000:]}")
        out = json.loads(lines[-1])
        if "error" in out:
            return Reply(None, {}, "", error=f"{out['error']} {out.get('cause', '')}".strip())
        return Reply(out["status"], {k.lower(): v for k, v in out["headers"].items()}, out["body"])

    # -- teardown --------------------------------------------------------------------
    def close(self) -> None:
        try:
            self.stop_proctor()
        except Exception:  # noqa: BLE001 - go on tearing down
            pass
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for ns in self.made:
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)  # its veth end and rules go with it
        sh("ip", "link", "del", f"pva{self.tag}", check=False)  # (left in the root namespace if a move failed)
        if self.hosts_dir is not None:
            shutil.rmtree(self.hosts_dir, ignore_errors=True)
        shutil.rmtree(self.base, ignore_errors=True)
