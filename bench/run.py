"""Proctor benchmark: throughput and latency of Proctor against bare mitmproxy, on loopback, in one run.

Forward-proxy mode (`--modes forward`):
  direct      client -> upstream                         (no proxy: the ceiling)
  bare        client -> bare mitmproxy -> upstream       (bench/bare_mitm.py: Proctor's
                                                          addon set + a no-op addon)
  proctor     client -> `proctor run` -> upstream        (full pipeline: JWT identity,
                                                          connector classification, 500
                                                          Cedar policies, decision record)
Gateway (reverse) mode (`--modes gateway`), the agent sending `Authorization: Bearer`:
  bare_gw     client -> bare mitmproxy, reverse mode -> upstream   (the same, `--reverse-to`)
  gw_aiohttp  client -> `proctor run`, gateway.engine aiohttp -> upstream
  gw_mitm     client -> `proctor run`, gateway.engine mitmproxy -> upstream

Every configuration runs as separate processes: the upstream (bench/upstream.py),
the proxy, and the load generator (wrk if installed, else bench/loadgen.py's
Python generator). With 2+ CPUs the processes are pinned so the proxy has a
core of its own (see `cpu_layout`).

Phases: pre-flight checks (Proctor answers 200 with X-Proctor-Decision-Id for
the benchmarked request without passing the agent's credential upstream, 403
for a forbidden one, 407 (forward) or 401 (gateway) without a token) -> max
throughput at high concurrency: direct once, then per repeat bare and proctor,
then bare_gw, gw_aiohttp and gw_mitm (--repeats times, interleaved) -> latency
at moderate load (a fixed, low request rate, the same for every config of a
mode), with the same interleaving -> a py-spy profile of bare, proctor and
gw_aiohttp under load (if py-spy is installed) -> the in-process per-stage
micro-benchmark (bench/micro.py). Non-2xx responses and socket errors are
counted in every phase and reported; a phase with any is marked invalid.

Run-to-run variation on a small VM is large, so the proxies' figures are
reported as the median and min-max range across the repeats, and the verdicts
against the targets use the median of the per-repeat ratio (throughput) and of
the per-repeat difference (p50), where each repeat pairs a bare phase with the
Proctor phase(s) of its mode run right after it.

    python bench/run.py                 # ~7 minutes; writes docs/performance.md
    python bench/run.py --no-write-docs --duration 5 --repeats 1
    python bench/run.py --modes gateway --duration 2 --repeats 1 --no-profile --no-micro
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import loadgen  # noqa: E402 (after the path setup above)
import proctor_env  # noqa: E402
import spyprof  # noqa: E402

PY = sys.executable
MODES = ("forward", "gateway")
MODE_CONFIGS = {
    "forward": ("direct", "bare", "proctor"),
    # bare first: each Proctor gateway phase is paired with the bare phase of its repeat
    "gateway": ("bare_gw", "gw_aiohttp", "gw_mitm"),
}
CONFIGS = MODE_CONFIGS["forward"]
GATEWAY_CONFIGS = ("bare_gw", "gw_mitm", "gw_aiohttp")  # table order
LABELS = {
    "direct": "direct (no proxy)",
    "bare": "bare mitmproxy + no-op addon",
    "proctor": "Proctor full pipeline (500 policies)",
    "bare_gw": "bare mitmproxy, reverse mode + no-op addon",
    "gw_mitm": "gateway engine mitmproxy + full pipeline",
    "gw_aiohttp": "gateway engine aiohttp + full pipeline",
}
ENGINES = {"gw_aiohttp": "aiohttp"}  # HTTP engine of each process, for the profile's rules (default mitmproxy)
PROFILED = ("bare", "proctor", "gw_aiohttp")  # py-spy'd, in this order, when their mode runs
TARGET_THROUGHPUT_RATIO = 0.85
TARGET_ADDED_P50_MS = 1.0
# Issue #11: the aiohttp gateway with the full pipeline at least 3x bare mitmproxy's throughput.
TARGET_GATEWAY_RATIO = 3.0


def mode_of(config: str) -> str:
    return next(m for m, names in MODE_CONFIGS.items() if config in names)


# ------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        if pred():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def cpu_layout(pin: bool) -> dict[str, list[int] | None]:
    """Which CPUs each process may use. The proxy under test always gets a core of its own."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        cpus = list(range(os.cpu_count() or 1))
    if not pin or len(cpus) < 2 or not shutil.which("taskset"):
        return {"proxy": None, "upstream": None, "client": None, "direct_client": None}
    if len(cpus) == 2:
        return {"proxy": [cpus[0]], "upstream": [cpus[1]], "client": [cpus[1]], "direct_client": [cpus[0]]}
    return {"proxy": [cpus[0]], "upstream": [cpus[1]], "client": cpus[2:], "direct_client": cpus[2:]}


def pinned(cmd: list[str], cpus: list[int] | None) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, cpus)), *cmd] if cpus else cmd


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (not its children), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_cpu_seconds() -> tuple[float, float]:
    """(user+nice+system, steal) CPU-seconds of the whole machine, from /proc/stat.

    irq/softirq time is left out on purpose: loopback TCP's softirq work is
    charged to no process, so it would otherwise look like "another process".
    """
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    steal = vals[7] if len(vals) > 7 else 0
    return (vals[0] + vals[1] + vals[2]) / tick, steal / tick


def children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def other_cores_now(own_pids: list[int], window: float = 1.0) -> float:
    """CPU cores used by processes other than ours (and this one) over `window` seconds."""
    pids = [p for p in own_pids if Path(f"/proc/{p}").exists()]
    own0 = sum(proc_cpu_seconds(p) for p in pids) + time.process_time()
    sys0, _ = system_cpu_seconds()
    time.sleep(window)
    sys1, _ = system_cpu_seconds()
    own1 = sum(proc_cpu_seconds(p) for p in pids if Path(f"/proc/{p}").exists()) + time.process_time()
    return max(0.0, (sys1 - sys0) - (own1 - own0)) / window


def wait_quiet(own_pids: list[int], max_wait: float, threshold: float) -> tuple[float, float]:
    """Wait (at most max_wait s) until other processes use less than `threshold` cores; (waited s, last level)."""
    t0 = time.monotonic()
    level = other_cores_now(own_pids)
    while level >= threshold and time.monotonic() - t0 < max_wait:
        level = other_cores_now(own_pids)
    return time.monotonic() - t0, level


# --------------------------------------------------------------- processes
@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    port: int

    @property
    def pid(self) -> int:
        # Under `taskset -c ... cmd` the pid is cmd's own (taskset execs it).
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def spawn(name: str, cmd: list[str], cpus, log: Path, port: int, cwd: Path | None = None) -> Proc:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONDEVMODE", None)
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        p = subprocess.Popen(pinned(cmd, cpus), stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                             start_new_session=True)
    return Proc(name, p, log, port)


# --------------------------------------------------------------- pre-flight
def http_get(port: int, target: str, headers: dict[str, str], method: str = "GET") -> tuple[int, dict, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, target, headers=headers)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def preflight(targets: dict[str, loadgen.Target], env: proctor_env.ProctorEnv) -> list[str]:
    """Prove each configuration answers the benchmarked request correctly; returns the checks done."""
    done = []
    for name, t in targets.items():
        h = {"Host": t.host_header}
        if t.proxy_authorization:
            h[t.auth_header] = t.proxy_authorization
        status, headers, body = http_get(t.connect_port, t.request_target, h)
        if status != 200:
            raise RuntimeError(f"pre-flight {name}: expected 200, got {status}: {body[:500]!r}")
        done.append(f"{name}: GET {t.request_target} -> 200")
        if name in ("proctor", "gw_aiohttp", "gw_mitm"):
            did = headers.get("x-proctor-decision-id")
            if not did:
                raise RuntimeError(f"pre-flight {name}: allowed response lacks X-Proctor-Decision-Id")
            done.append(f"{name}: allowed response carries X-Proctor-Decision-Id ({did})")
            if headers.get("x-bench-credential-seen"):
                raise RuntimeError(f"pre-flight {name}: the agent's {t.auth_header} reached the upstream (not stripped)")
            done.append(f"{name}: the agent's {t.auth_header} header did not reach the upstream")
            s2, _, b2 = http_get(t.connect_port, t.request_target, h, method="DELETE")
            problem = json.loads(b2) if b2 else {}
            if s2 != 403 or "bench-no-item-deletes" not in problem.get("reasons", []):
                raise RuntimeError(f"pre-flight {name}: DELETE should be 403 by bench-no-item-deletes, got {s2}: {b2[:500]!r}")
            done.append(f"{name}: DELETE {t.request_target} -> 403 (reasons {', '.join(problem['reasons'])})")
            # forward proxy: 407 Proxy Authentication Required; gateway: 401 with WWW-Authenticate
            want = 407 if name == "proctor" else 401
            s3, _, _ = http_get(t.connect_port, t.request_target, {"Host": t.host_header})
            if s3 != want:
                raise RuntimeError(f"pre-flight {name}: a request without a token should be {want}, got {s3}")
            done.append(f"{name}: GET without a token -> {want}")
    return done


def proctor_stats(control_port: int) -> dict:
    try:
        status, _, body = http_get(control_port, "/v1/stats", {"Host": f"127.0.0.1:{control_port}"})
        return json.loads(body) if status == 200 else {}
    except (OSError, ValueError):
        return {}


# -------------------------------------------------------------- measuring
@dataclass
class Phase:
    config: str
    kind: str  # throughput | latency
    result: loadgen.LoadResult
    proxy_cpu_s: float | None  # CPU-seconds the proxy process used during the phase
    other_cpu_s: float  # CPU-seconds used by processes outside the benchmark during the phase
    wall_s: float
    steal_s: float = 0.0  # CPU-seconds the hypervisor stole from this VM during the phase
    retried: bool = False  # the first attempt was noisy and this is the cleaner of two
    repeat: int | None = None  # 1..--repeats for bare/proctor throughput and latency; None for phases run once

    @property
    def other_cores(self) -> float:
        return self.other_cpu_s / self.wall_s if self.wall_s else 0.0

    @property
    def valid(self) -> bool:
        return self.result.non2xx == 0 and self.result.errors == 0 and self.result.requests > 0

    @property
    def proxy_us_per_req(self) -> float | None:
        if self.proxy_cpu_s is None or not self.result.requests:
            return None
        return self.proxy_cpu_s / self.result.requests * 1e6

    def as_dict(self) -> dict:
        d = asdict(self.result)
        d.update(config=self.config, kind=self.kind, rps=round(self.result.rps, 1), proxy_cpu_s=self.proxy_cpu_s,
                 proxy_us_per_req=self.proxy_us_per_req, other_cpu_s=round(self.other_cpu_s, 2),
                 wall_s=round(self.wall_s, 2), steal_s=round(self.steal_s, 2), valid=self.valid,
                 other_cores=round(self.other_cores, 3), retried=self.retried, repeat=self.repeat)
        return d


def measure(config: str, kind: str, gen: str, target: loadgen.Target, conns: int, duration: float, think_ms: float,
            cpus, proxy: Proc | None, bench_pids: list[int], py_procs: int) -> Phase:
    pids = [p for p in bench_pids if Path(f"/proc/{p}").exists()]
    own0 = sum(proc_cpu_seconds(p) for p in pids)
    pcpu0 = proc_cpu_seconds(proxy.pid) if proxy else None
    ch0 = children_cpu_seconds()
    sys0, steal0 = system_cpu_seconds()
    me0 = time.process_time()
    t0 = time.monotonic()
    res = loadgen.run_load(gen, target, conns, duration, think_ms, cpus=cpus, py_procs=py_procs)
    wall = time.monotonic() - t0
    sys1, steal1 = system_cpu_seconds()
    ch1 = children_cpu_seconds()
    me1 = time.process_time()
    own1 = sum(proc_cpu_seconds(p) for p in pids if Path(f"/proc/{p}").exists())
    pcpu = (proc_cpu_seconds(proxy.pid) - pcpu0) if proxy and pcpu0 is not None else None
    ours = (own1 - own0) + (ch1 - ch0) + (me1 - me0)
    other = max(0.0, (sys1 - sys0) - ours)
    return Phase(config, kind, res, pcpu, other, wall, steal1 - steal0)


def measure_clean(args: argparse.Namespace, *a, **kw) -> Phase:
    """measure(), retried once (after waiting for quiet) if other processes competed for the CPUs."""
    ph = measure(*a, **kw)
    if ph.other_cores > args.noise_threshold and args.retry_noisy and args._retries_left > 0:
        args._retries_left -= 1
        bench_pids = a[9] if len(a) > 9 else kw["bench_pids"]
        print(f"    other processes used {ph.other_cores:.2f} cores during {ph.config}/{ph.kind}; "
              f"waiting for quiet (<= {args.quiet_wait:g} s) and retrying it once")
        wait_quiet(bench_pids, args.quiet_wait, args.noise_threshold)
        again = measure(*a, **kw)
        ph = min(ph, again, key=lambda p: p.other_cores)
        ph.retried = True
    return ph


def fmt(v: float | None, nd: int = 2) -> str:
    return "n/a" if v is None else f"{v:,.{nd}f}"


def median(vals: list[float]) -> float:
    return statistics.median(vals) if vals else float("nan")


def med_range(vals: list[float], nd: int = 3, fmt_one=None) -> str:
    """'median (min–max)', or just the value when there is only one."""
    f = fmt_one or (lambda v: f"{v:,.{nd}f}")
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f(vals[0])
    return f"{f(median(vals))} ({f(min(vals))}–{f(max(vals))})"


# -------------------------------------------------------------- machine info
def machine_info() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    virt = ""
    if shutil.which("lscpu"):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Hypervisor vendor"):
                virt = f", virtualised ({line.split(':', 1)[1].strip()})"

    def ver(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    wrk_v = ""
    if shutil.which("wrk"):
        wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False).stdout.splitlines()[0:1]
        wrk_v = wrk_v[0].split(" Copyright")[0] if wrk_v else "wrk"
    return {
        "cpu": cpu + virt,
        "cores": os.cpu_count(),
        "ram": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "mitmproxy": ver("mitmproxy"),
        "cedarpy": ver("cedarpy"),
        "aiohttp": ver("aiohttp"),
        "pyjwt": ver("PyJWT"),
        "wrk": wrk_v,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else [],
    }


# ------------------------------------------------------------------- main
@dataclass
class Run:
    args: dict
    machine: dict
    generator: str
    layout: dict
    preflight: list[str] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    modes: list[str] = field(default_factory=lambda: list(MODES))
    think_ms: dict[str, float] = field(default_factory=dict)  # mode -> mean think time at moderate load
    moderate_target_rps: dict[str, float] = field(default_factory=dict)  # mode -> offered rate at moderate load
    profiles: dict[str, dict] = field(default_factory=dict)  # config -> spyprof.categorise() result
    profile_phases: dict[str, Phase] = field(default_factory=dict)
    micro: dict | None = None
    proctor_stats: dict[str, dict] = field(default_factory=dict)  # Proctor config -> its /v1/stats after the run
    policy_stats: dict = field(default_factory=dict)
    started: str = ""
    elapsed_s: float = 0
    quiet_wait: tuple[float, float] | None = None
    repeats: int = 1

    def phase(self, config: str, kind: str, repeat: int | None = None) -> Phase | None:
        return next((p for p in self.phases if p.config == config and p.kind == kind
                     and (repeat is None or p.repeat == repeat)), None)

    def phases_of(self, config: str, kind: str) -> list[Phase]:
        """Every phase of one config and kind, in the order run (one per repeat for bare/proctor)."""
        return [p for p in self.phases if p.config == config and p.kind == kind]


def run(args: argparse.Namespace) -> Run:
    t_start = time.monotonic()
    gen = args.generator
    if gen == "auto":
        gen = "wrk" if loadgen.have_wrk() else "python"
    elif gen == "wrk" and not loadgen.have_wrk():
        raise SystemExit("--generator wrk: wrk is not installed (apt-get install wrk)")
    layout = cpu_layout(not args.no_pin)
    modes = [m for m in MODES if m in args.modes]
    r = Run(args={k: v for k, v in vars(args).items() if not k.startswith("_")}, machine=machine_info(), generator=gen, layout=layout,
            started=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), repeats=args.repeats, modes=modes)
    print(f"load generator: {gen}" + (" (wrk found on PATH)" if gen == "wrk" else " (Python asyncio fallback)"))
    print(f"CPU layout: {layout}; modes: {', '.join(modes)}")

    tmp = Path(tempfile.mkdtemp(prefix="proctor-bench-"))
    procs: list[Proc] = []
    try:
        up_port, pr_port, pr_ctl = free_port(), free_port(), free_port()
        env = proctor_env.build(tmp / "proctor", up_port, pr_port, pr_ctl, args.policies)
        r.policy_stats = env.policy_stats
        upstream = spawn("upstream", [PY, str(BENCH / "upstream.py"), "--port", str(up_port)], layout["upstream"],
                         tmp / "upstream.log", up_port)
        procs.append(upstream)
        up_hostport = f"127.0.0.1:{up_port}"
        absolute = f"http://{up_hostport}/items/1"
        targets: dict[str, loadgen.Target] = {}
        proxies: dict[str, Proc | None] = {}
        controls: dict[str, int] = {}  # Proctor config -> its control API port
        bare_cmd = [PY, str(BENCH / "bare_mitm.py"), "--confdir", str(tmp / "bare-ca")]
        proctor_cmd = [PY, "-m", "proxy.cli", "run", "--log-level", "info"]
        if "forward" in modes:
            bare_port = free_port()
            proxies["bare"] = spawn("bare", [*bare_cmd, "--port", str(bare_port)], layout["proxy"], tmp / "bare.log",
                                    bare_port)
            proxies["proctor"] = spawn("proctor", [*proctor_cmd, "-c", str(env.config_path)], layout["proxy"],
                                       tmp / "proctor.log", pr_port, cwd=env.dir)
            controls["proctor"] = pr_ctl
            proxies["direct"] = None
            targets["direct"] = loadgen.Target("127.0.0.1", up_port, "/items/1", up_hostport)
            targets["bare"] = loadgen.Target("127.0.0.1", bare_port, absolute, up_hostport)
            targets["proctor"] = loadgen.Target("127.0.0.1", pr_port, absolute, up_hostport, env.proxy_authorization)
        if "gateway" in modes:
            # Gateway (reverse) mode: the agent sends origin-form requests to the gateway's own
            # address with `Authorization: Bearer <jwt>`; the route `/` leads to the same upstream.
            gw_port = free_port()
            proxies["bare_gw"] = spawn("bare_gw", [*bare_cmd, "--port", str(gw_port), "--reverse-to", f"http://{up_hostport}"],
                                       layout["proxy"], tmp / "bare_gw.log", gw_port)
            targets["bare_gw"] = loadgen.Target("127.0.0.1", gw_port, "/items/1", f"127.0.0.1:{gw_port}")
            for name, engine in (("gw_aiohttp", "aiohttp"), ("gw_mitm", "mitmproxy")):
                port, ctl, gport = free_port(), free_port(), free_port()
                cfg = proctor_env.gateway_config(env, name, port, ctl, gport, engine)
                proxies[name] = spawn(name, [*proctor_cmd, "-c", str(cfg)], layout["proxy"], tmp / f"{name}.log", gport,
                                      cwd=env.dir)
                controls[name] = ctl
                targets[name] = loadgen.Target("127.0.0.1", gport, "/items/1", f"127.0.0.1:{gport}",
                                               env.proxy_authorization, auth_header="Authorization")
        procs.extend(p for p in proxies.values() if p is not None)
        wait_for(lambda: port_open(up_port), 20, "upstream", upstream.popen, upstream.log)
        for name in ("bare", "bare_gw"):
            if name in proxies:
                bp = proxies[name]
                assert bp is not None
                wait_for(lambda bp=bp: port_open(bp.port), 30, f"{name} mitmproxy", bp.popen, bp.log)

        def ready(ctl: int) -> bool:
            try:
                return http_get(ctl, "/readyz", {"Host": "127.0.0.1"})[0] == 200
            except OSError:
                return False

        for name, ctl in controls.items():
            pp = proxies[name]
            assert pp is not None
            wait_for(lambda ctl=ctl: ready(ctl), 60, f"{name} readiness", pp.popen, pp.log)

        client_cpus = {name: layout["direct_client"] if name == "direct" else layout["client"] for name in targets}
        bench_pids = [p.pid for p in procs]

        r.preflight = preflight(targets, env)
        for line in r.preflight:
            print(f"  ok  {line}")
        if args.wait_quiet > 0:
            waited, level = wait_quiet(bench_pids, args.wait_quiet, args.noise_threshold)
            r.quiet_wait = (waited, level)
            print(f"waited {waited:.0f} s for a quiet machine (other processes now use {level:.2f} cores)")

        # direct once, then per repeat the forward pair and the gateway trio, interleaved, so
        # drift in the machine's speed hits all alike; each Proctor phase comes right after the
        # bare mitmproxy phase of its mode (the pair a per-repeat ratio is computed from).
        schedule: list[tuple[str, int | None]] = [("direct", None)] if "forward" in modes else []
        for i in range(1, args.repeats + 1):
            for mode in modes:
                schedule += [(name, i) for name in MODE_CONFIGS[mode] if name != "direct"]

        # -- (a) max throughput at high concurrency
        print(f"\nmax throughput: {args.connections} connections, {args.duration:g} s each (after {args.warmup:g} s warm-up); "
              + ("direct once, " if "forward" in modes else "") + f"the proxies {args.repeats}x interleaved")
        for name, i in schedule:
            loadgen.run_load(gen, targets[name], args.connections, args.warmup, 0, cpus=client_cpus[name], py_procs=args.py_procs)
            ph = measure_clean(args, name, "throughput", gen, targets[name], args.connections, args.duration, 0, client_cpus[name],
                               proxies[name], bench_pids, args.py_procs)
            ph.repeat = i
            r.phases.append(ph)
            tag = f"#{i}" if i else ""
            print(f"  {name:10s}{tag:>3s} {ph.result.rps:10,.0f} req/s   non-2xx {ph.result.non2xx}  errors {ph.result.errors}"
                  f"   proxy CPU/req {fmt(ph.proxy_us_per_req, 0)} µs   other processes {ph.other_cores:.2f} cores")

        # -- (b) latency at moderate load: one fixed offered rate for every config of a mode
        for mode in modes:
            names = [n for n in MODE_CONFIGS[mode] if n != "direct"]
            slowest = min(median([p.result.rps for p in r.phases_of(name, "throughput")]) for name in names)
            if args.think_ms is not None:
                think = float(args.think_ms)
            else:
                target_rps = max(10.0, slowest * args.moderate_fraction)
                think = max(1.0, round(args.latency_connections / target_rps * 1000))
            r.think_ms[mode] = think
            r.moderate_target_rps[mode] = args.latency_connections / (think / 1000)
            print(f"\nlatency at moderate load ({mode}): {args.latency_connections} connections, mean {think:g} ms random "
                  f"think time per connection (offered <= {r.moderate_target_rps[mode]:,.0f} req/s, "
                  f"{r.moderate_target_rps[mode] / slowest * 100:.0f}% of the slowest proxy's median max), "
                  f"{args.latency_duration:g} s each")
        print("\nlatency phases, interleaved like the throughput phases:")
        for name, i in schedule:
            think = r.think_ms[mode_of(name)]
            loadgen.run_load(gen, targets[name], args.latency_connections, 1, think, cpus=client_cpus[name], py_procs=args.py_procs)
            ph = measure_clean(args, name, "latency", gen, targets[name], args.latency_connections, args.latency_duration, think,
                               client_cpus[name], proxies[name], bench_pids, args.py_procs)
            ph.repeat = i
            r.phases.append(ph)
            res = ph.result
            tag = f"#{i}" if i else ""
            print(f"  {name:10s}{tag:>3s} {res.rps:8,.0f} req/s   p50 {res.p50_ms:.3f}  p90 {res.p90_ms:.3f}  p99 {res.p99_ms:.3f} ms"
                  f"   non-2xx {res.non2xx}  errors {res.errors}   other processes {ph.other_cores:.2f} cores")

        # -- profile the proxies under load (py-spy samples the real processes from outside)
        if not args.no_profile:
            if spyprof.have_pyspy():
                for name in [n for n in PROFILED if n in proxies]:
                    proxy = proxies[name]
                    assert proxy is not None
                    out = tmp / f"{name}.pyspy.txt"
                    print(f"\nprofiling {name} with py-spy for {args.profile_seconds:g} s under {args.connections}-connection load")
                    spy = spyprof.record(proxy.pid, args.profile_seconds + 1, out, cpus=layout["client"])
                    time.sleep(0.5)
                    ph = measure(name, "profile", gen, targets[name], args.connections, args.profile_seconds, 0,
                                 layout["client"], proxy, bench_pids, args.py_procs)
                    spy_out, _ = spy.communicate(timeout=60)
                    if out.exists():
                        prof = spyprof.categorise(out, ENGINES.get(name, "mitmproxy"))
                        prof["tool"] = "py-spy"
                        r.profiles[name] = prof
                        r.profile_phases[name] = ph
                        print(f"  {prof['samples']} samples")
                    else:
                        print(f"  py-spy produced no profile: {spy_out.strip()[-500:]}")
            else:
                print("\npy-spy not installed: skipping the process profiles (pip install py-spy)")

        r.proctor_stats = {name: proctor_stats(ctl) for name, ctl in controls.items()}
    finally:
        for p in reversed(procs):
            p.stop()
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")

    if not args.no_micro:
        import micro

        print("\nper-stage micro-benchmark (in-process)")
        r.micro = micro.run_micro(args.policies, budget_s=args.micro_budget)
        print(micro.format_table(r.micro))
    r.elapsed_s = time.monotonic() - t_start
    return r


# ---------------------------------------------------------------- report
def results_table(r: Run) -> str:
    """One row per configuration: the median across its repeats, with the min–max range in parentheses."""
    lines = [
        "| configuration | runs | max throughput (req/s) | p50 (ms) | p90 (ms) | p99 (ms) | non-2xx / errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in CONFIGS:
        ts, ls = r.phases_of(name, "throughput"), r.phases_of(name, "latency")
        if not ts or not ls:
            continue
        bad = f"{sum(p.result.non2xx for p in ts + ls)} / {sum(p.result.errors for p in ts + ls)}"
        lines.append(
            f"| {LABELS[name]} | {len(ts)} | {med_range([p.result.rps for p in ts], 0)} | "
            f"{med_range([p.result.p50_ms for p in ls])} | {med_range([p.result.p90_ms for p in ls])} | "
            f"{med_range([p.result.p99_ms for p in ls])} | {bad} |")
    return "\n".join(lines)


def repeats_table(r: Run) -> str:
    """Per repeat: the paired bare/Proctor figures the verdicts are computed from, then their medians."""
    tg = targets(r)
    yes = lambda ok: "yes" if ok else "no"
    lines = [
        (f"| repeat | bare (req/s) | Proctor (req/s) | Proctor / bare | ≥ {TARGET_THROUGHPUT_RATIO:.0%} | "
         f"bare p50 (ms) | Proctor p50 (ms) | added p50 (ms) | < {TARGET_ADDED_P50_MS:g} ms | added p90 (ms) | added p99 (ms) |"),
        "|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    sgn = lambda v: f"{v:+.3f}"
    for x in tg["repeats"]:
        cells = [str(x["repeat"])]
        if x.get("ratio") is not None:
            cells += [f"{x['bare_rps']:,.0f}", f"{x['proctor_rps']:,.0f}", f"{x['ratio']:.1%}", yes(x["throughput_met"])]
        else:
            cells += ["n/a"] * 4
        if x.get("added_p50_ms") is not None:
            cells += [f"{x['bare_p50_ms']:.3f}", f"{x['proctor_p50_ms']:.3f}", sgn(x["added_p50_ms"]),
                      yes(x["added_p50_met"]), sgn(x["added_p90_ms"]), sgn(x["added_p99_ms"])]
        else:
            cells += ["n/a"] * 6
        lines.append("| " + " | ".join(cells) + " |")
    rs = tg["repeats"]
    col = lambda k: [x[k] for x in rs if x.get(k) is not None]
    lines.append(
        f"| **median** | {median(col('bare_rps')):,.0f} | {median(col('proctor_rps')):,.0f} | "
        f"**{tg['throughput_ratio']:.1%}** | {tg['throughput_met_count']} of {tg['n_throughput']} | "
        f"{median(col('bare_p50_ms')):.3f} | {median(col('proctor_p50_ms')):.3f} | **{sgn(tg['added_p50_ms'])}** | "
        f"{tg['added_p50_met_count']} of {tg['n_latency']} | {sgn(tg['added_p90_ms'])} | {sgn(tg['added_p99_ms'])} |")
    return "\n".join(lines)


def detail_table(r: Run) -> str:
    lines = [
        (
            "| config | phase | repeat | conns | think (ms) | requests | duration (s) | req/s | p50 (ms) | mean (ms) | max (ms) | "
            "proxy CPU per request (µs) | other processes (CPU cores) |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    phases = list(r.phases) + list(r.profile_phases.values())
    for p in phases:
        x = p.result
        kind = p.kind + (" (retried)" if p.retried else "")
        rep = str(p.repeat) if p.repeat else "once"
        lines.append(f"| {p.config} | {kind} | {rep} | {x.connections} | {x.think_ms:g} | {x.requests:,} | {x.duration_s:.1f} | "
                     f"{x.rps:,.0f} | {x.p50_ms:.3f} | {x.mean_ms:.3f} | {x.max_ms:.1f} | {fmt(p.proxy_us_per_req, 0)} | "
                     f"{p.other_cores:.2f} |")
    return "\n".join(lines)


def targets(r: Run) -> dict:
    """Verdicts from the MEDIAN of the per-repeat values (each repeat pairs a bare phase with the Proctor phase after it)."""
    per: list[dict] = []
    for i in range(1, r.repeats + 1):
        x: dict = {"repeat": i}
        bt, pt = r.phase("bare", "throughput", i), r.phase("proctor", "throughput", i)
        if bt and pt and bt.result.rps:
            ratio = pt.result.rps / bt.result.rps
            x.update(bare_rps=bt.result.rps, proctor_rps=pt.result.rps, ratio=ratio,
                     throughput_met=ratio >= TARGET_THROUGHPUT_RATIO,
                     cpu_bare_us=bt.proxy_us_per_req, cpu_proctor_us=pt.proxy_us_per_req)
        bl, pl = r.phase("bare", "latency", i), r.phase("proctor", "latency", i)
        if bl and pl:
            added = pl.result.p50_ms - bl.result.p50_ms
            x.update(bare_p50_ms=bl.result.p50_ms, proctor_p50_ms=pl.result.p50_ms, added_p50_ms=added,
                     added_p50_met=added < TARGET_ADDED_P50_MS,
                     added_p90_ms=pl.result.p90_ms - bl.result.p90_ms, added_p99_ms=pl.result.p99_ms - bl.result.p99_ms,
                     lat_cpu_bare_us=bl.proxy_us_per_req, lat_cpu_proctor_us=pl.proxy_us_per_req)
        per.append(x)
    col = lambda k: [x[k] for x in per if x.get(k) is not None]
    ratios, added = col("ratio"), col("added_p50_ms")
    ratio, added_p50 = median(ratios), median(added)
    med_or_none = lambda k: median(col(k)) if col(k) else None
    cpu_b, cpu_p = med_or_none("cpu_bare_us"), med_or_none("cpu_proctor_us")
    return {
        "repeats": per,
        "n_throughput": len(ratios),
        "n_latency": len(added),
        "throughput_ratio": ratio,  # median of the per-repeat ratios
        "throughput_ratio_min": min(ratios, default=float("nan")),
        "throughput_ratio_max": max(ratios, default=float("nan")),
        "throughput_met": ratio >= TARGET_THROUGHPUT_RATIO,
        "throughput_met_count": sum(1 for x in per if x.get("throughput_met")),
        "added_p50_ms": added_p50,  # median of the per-repeat differences
        "added_p50_min_ms": min(added, default=float("nan")),
        "added_p50_max_ms": max(added, default=float("nan")),
        "added_p50_met": added_p50 < TARGET_ADDED_P50_MS,
        "added_p50_met_count": sum(1 for x in per if x.get("added_p50_met")),
        "added_p90_ms": median(col("added_p90_ms")),
        "added_p99_ms": median(col("added_p99_ms")),
        "cpu_bare_us": cpu_b,  # medians across repeats, max-throughput phases
        "cpu_proctor_us": cpu_p,
        "cpu_added_us": (cpu_p - cpu_b) if cpu_b is not None and cpu_p is not None else None,
        "lat_cpu_bare_us": med_or_none("lat_cpu_bare_us"),  # medians across repeats, moderate-load phases
        "lat_cpu_proctor_us": med_or_none("lat_cpu_proctor_us"),
        "valid": all(p.valid for p in r.phases),
    }


def gateway_targets(r: Run) -> dict:
    """Gateway mode, per repeat and as medians: each Proctor gateway phase against the bare
    reverse-mode mitmproxy phase of the same repeat (run just before it)."""
    per: list[dict] = []
    for i in range(1, r.repeats + 1):
        x: dict = {"repeat": i}
        for name in GATEWAY_CONFIGS:
            t, lat = r.phase(name, "throughput", i), r.phase(name, "latency", i)
            if t:
                x[f"{name}_rps"] = t.result.rps
                x[f"{name}_cpu_us"] = t.proxy_us_per_req
            if lat:
                x[f"{name}_p50_ms"] = lat.result.p50_ms
                x[f"{name}_lat_cpu_us"] = lat.proxy_us_per_req
        bare = x.get("bare_gw_rps")
        if bare:
            for name in ("gw_aiohttp", "gw_mitm"):
                if x.get(f"{name}_rps") is not None:
                    x[f"{name}_ratio"] = x[f"{name}_rps"] / bare
        if x.get("gw_aiohttp_rps") is not None and x.get("gw_mitm_rps"):
            x["engine_ratio"] = x["gw_aiohttp_rps"] / x["gw_mitm_rps"]
        if x.get("gw_aiohttp_ratio") is not None:
            x["met"] = x["gw_aiohttp_ratio"] >= TARGET_GATEWAY_RATIO
        per.append(x)
    col = lambda k: [x[k] for x in per if x.get(k) is not None]
    med = lambda k: median(col(k)) if col(k) else None
    ratios = col("gw_aiohttp_ratio")
    return {
        "repeats": per,
        "n": len(ratios),
        "ratio": med("gw_aiohttp_ratio"),  # median of the per-repeat aiohttp / bare ratios
        "ratio_min": min(ratios, default=None),
        "ratio_max": max(ratios, default=None),
        "met": bool(ratios) and median(ratios) >= TARGET_GATEWAY_RATIO,
        "met_count": sum(1 for x in per if x.get("met")),
        "mitm_ratio": med("gw_mitm_ratio"),
        "engine_ratio": med("engine_ratio"),
        **{f"{name}_cpu_us": med(f"{name}_cpu_us") for name in GATEWAY_CONFIGS},
        **{f"{name}_lat_cpu_us": med(f"{name}_lat_cpu_us") for name in GATEWAY_CONFIGS},
        "valid": all(p.valid for p in r.phases if p.config in GATEWAY_CONFIGS),
    }


def gateway_table(r: Run) -> str:
    """One row per gateway configuration: medians across the repeats (min–max)."""
    g = gateway_targets(r)
    lines = [
        "| configuration | runs | max throughput (req/s) | × bare (reverse) | p50 (ms) | p90 (ms) | p99 (ms) | "
        "proxy CPU µs/req at max throughput | proxy CPU µs/req at moderate load | non-2xx / errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in GATEWAY_CONFIGS:
        ts, ls = r.phases_of(name, "throughput"), r.phases_of(name, "latency")
        if not ts or not ls:
            continue
        bad = f"{sum(p.result.non2xx for p in ts + ls)} / {sum(p.result.errors for p in ts + ls)}"
        cpu = [p.proxy_us_per_req for p in ts if p.proxy_us_per_req is not None]
        lcpu = [p.proxy_us_per_req for p in ls if p.proxy_us_per_req is not None]
        ratios = [x[f"{name}_ratio"] for x in g["repeats"] if x.get(f"{name}_ratio") is not None]
        ratio = "1.00×" if name == "bare_gw" else med_range(ratios, fmt_one=lambda v: f"{v:.2f}×")
        lines.append(
            f"| {LABELS[name]} | {len(ts)} | {med_range([p.result.rps for p in ts], 0)} | {ratio} | "
            f"{med_range([p.result.p50_ms for p in ls])} | {med_range([p.result.p90_ms for p in ls])} | "
            f"{med_range([p.result.p99_ms for p in ls])} | {med_range(cpu, 0)} | {med_range(lcpu, 0)} | {bad} |")
    return "\n".join(lines)


def gateway_repeats_table(r: Run) -> str:
    g = gateway_targets(r)
    lines = [
        "| repeat | bare reverse (req/s) | aiohttp gateway (req/s) | mitmproxy gateway (req/s) | aiohttp / bare | "
        f"≥ {TARGET_GATEWAY_RATIO:g}× | mitmproxy / bare | aiohttp / mitmproxy | CPU µs/req: bare / aiohttp / mitmproxy |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    num = lambda v, f: "n/a" if v is None else f(v)
    for x in g["repeats"]:
        cpu = " / ".join(num(x.get(f"{n}_cpu_us"), lambda v: f"{v:,.0f}") for n in ("bare_gw", "gw_aiohttp", "gw_mitm"))
        lines.append(
            f"| {x['repeat']} | {num(x.get('bare_gw_rps'), lambda v: f'{v:,.0f}')} | "
            f"{num(x.get('gw_aiohttp_rps'), lambda v: f'{v:,.0f}')} | {num(x.get('gw_mitm_rps'), lambda v: f'{v:,.0f}')} | "
            f"{num(x.get('gw_aiohttp_ratio'), lambda v: f'{v:.2f}×')} | {'yes' if x.get('met') else 'no'} | "
            f"{num(x.get('gw_mitm_ratio'), lambda v: f'{v:.2f}×')} | {num(x.get('engine_ratio'), lambda v: f'{v:.2f}×')} | "
            f"{cpu} |")
    return "\n".join(lines)


def render_gateway(r: Run) -> list[str]:
    """The "Gateway mode" section."""
    a, out = r.args, []
    w = out.append
    g = gateway_targets(r)
    n = g["n"]
    w("## Gateway mode\n")
    w("Proctor's gateway (reverse) listener, where agents send ordinary requests to Proctor's address with "
      "`Authorization: Bearer <jwt>` (which Proctor strips before forwarding) and a route sends them on "
      "(`gateway.routes: [{prefix: /, upstream: http://127.0.0.1:<upstream>}]`), served by each gateway engine "
      "(`gateway.engine`, see docs/architecture.md) with the same deployment, policy set, connector and workload as "
      "above, against mitmproxy in reverse mode with the same engine options and a no-op addon "
      "(`bench/bare_mitm.py --reverse-to`, the same GET without the token). Each Proctor configuration is its own "
      "`proctor run` process (own ports and state directory) on the same CPU as every proxy; in every repeat the "
      "three run right after the forward pair, bare first, so each ratio below pairs phases of one repeat. "
      f"Max throughput as above; latency at moderate load with a mean think time of {r.think_ms.get('gateway', 0):g} ms "
      f"(≈{r.moderate_target_rps.get('gateway', 0):,.0f} req/s offered to each, {a['moderate_fraction'] * 100:.0f}% "
      "of the slowest gateway configuration's median maximum).\n")
    w(gateway_table(r) + "\n")
    if n:
        spread = (f" (median of {n} repeats; per repeat {g['ratio_min']:.2f}× to {g['ratio_max']:.2f}×)" if n > 1 else "")
        w(f"- Goal (issue #11): the aiohttp gateway with the full pipeline at least {TARGET_GATEWAY_RATIO:g}× bare "
          f"mitmproxy's throughput: **{g['ratio']:.2f}×**{spread} — {'**met**' if g['met'] else '**not met**'}"
          + (f"; met in {g['met_count']} of {n} repeats." if n > 1 else "."))
        cb, ca, cm = g["bare_gw_cpu_us"], g["gw_aiohttp_cpu_us"], g["gw_mitm_cpu_us"]
        if cb and ca:
            w(f"- A single-threaded proxy's throughput is the inverse of its CPU per request: {TARGET_GATEWAY_RATIO:g}× "
              f"bare mitmproxy means at most {cb / TARGET_GATEWAY_RATIO:.0f} µs of CPU per request for engine and "
              f"pipeline together (bare reverse mitmproxy uses {cb:.0f} µs); the aiohttp gateway uses {ca:.0f} µs"
              + (f", {ca / (cb / TARGET_GATEWAY_RATIO):.1f}× that budget." if ca > cb / TARGET_GATEWAY_RATIO else "."))
        if ca and cm and g["engine_ratio"]:
            w(f"- Same pipeline, other engine: the aiohttp gateway serves {g['engine_ratio']:.2f}× the mitmproxy "
              f"gateway's throughput (median of the per-repeat ratios) and uses {cm - ca:,.0f} µs less CPU per "
              f"request ({ca:.0f} against {cm:.0f} µs); the mitmproxy gateway reaches {g['mitm_ratio']:.2f}× bare "
              "mitmproxy.")
        if not g["valid"]:
            w("- **Some gateway phase saw non-2xx responses or socket errors: those numbers are not valid measurements.**")
        w("")
    if n > 1:
        w("Per repeat:\n")
        w(gateway_repeats_table(r) + "\n")
    prof, ph = r.profiles.get("gw_aiohttp"), r.profile_phases.get("gw_aiohttp")
    cpu = ph.proxy_us_per_req if ph else None
    if prof and prof.get("samples") and cpu:
        w("### What dominates the aiohttp gateway's CPU\n")
        w(f"py-spy sampled the aiohttp gateway process ({a['profile_seconds']:g} s at 250 Hz, non-blocking) while it "
          f"served {a['connections']} connections at full speed: {ph.result.rps:,.0f} req/s with {cpu:.0f} µs of CPU "
          f"per request ({prof['samples']:,} busy samples), attributed by `bench/spyprof.py`'s aiohttp rules "
          "(stage frames anywhere on the stack win; then the upstream client and the answer-writing frames; then "
          "the adapter's own code; then aiohttp's server underneath).\n")
        w("| where | µs per request | share |")
        w("|---|---:|---:|")
        rows = [row for row in prof["shares"] if row["share"] > 0]
        for row in rows:
            w(f"| {row['category']} | {row['share'] / 100 * cpu:.0f} | {row['share']:.1f}% |")
        w("")
        us = {row["category"]: row["share"] / 100 * cpu for row in rows}
        stages = sum(v for k, v in us.items() if k in spyprof.PROCTOR_CATEGORIES and k not in spyprof.ADAPTER_CATEGORIES)
        adapter = sum(v for k, v in us.items() if k in spyprof.ADAPTER_CATEGORIES)
        engine = cpu - stages - adapter
        top = sorted(rows, key=lambda row: -row["share"])[:3]
        w(f"- The stage chain (identity, classification, Cedar, the decision record and audit event, metrics, the "
          f"chain itself) is ≈{stages:.0f} µs of the {cpu:.0f} µs ({stages / cpu:.0%}); the adapter's own code "
          f"≈{adapter:.0f} µs; aiohttp, asyncio and the interpreter underneath ≈{engine:.0f} µs."
          + (f" Bare reverse mitmproxy spends {g['bare_gw_cpu_us']:.0f} µs per request on everything, so the engine "
             f"part alone is {engine / g['bare_gw_cpu_us']:.2f}× of it." if g.get("bare_gw_cpu_us") else ""))
        w("- Largest items: " + "; ".join(f"{row['category'].split(' (')[0]} ≈{row['share'] / 100 * cpu:.0f} µs"
                                          for row in top) + ".")
        if g.get("bare_gw_cpu_us"):
            budget = g["bare_gw_cpu_us"] / TARGET_GATEWAY_RATIO
            w(f"- The {TARGET_GATEWAY_RATIO:g}× goal leaves {budget:.0f} µs per request for everything; the stages "
              f"alone take ≈{stages:.0f} µs"
              + (", so no engine, however cheap, meets it while Cedar evaluation and the decision record and audit "
                 "event run in this one process at their current cost." if stages >= budget else
                 f", so the engine would have to fit in ≈{budget - stages:.0f} µs."))
        w("- Top functions by self time: " + ", ".join(f"`{row['function']}` {row['share']:.1f}%"
                                                      for row in prof["top_self"][:5]) + ".")
        w("")
    elif not a.get("no_profile"):
        w("No profile of the aiohttp gateway in this run (py-spy not installed: `.venv/bin/pip install py-spy`).\n")
    for name in ("gw_aiohttp", "gw_mitm"):
        st = r.proctor_stats.get(name, {})
        eng = st.get("engine", {})
        if eng:
            w(f"{LABELS[name]}: {eng.get('requests', 0):,} requests, {eng.get('allowed', 0):,} allowed, "
              f"{eng.get('refused', 0):,} refused (the pre-flight's), {st.get('records_written', 0):,} decision records.  ")
    w("")
    return out


def render_cost(r: Run) -> list[str]:
    """The "What dominates the cost" section."""
    a, out = r.args, []
    w = out.append
    w("## What dominates the cost\n")
    pp, pb = r.profiles.get("proctor"), r.profiles.get("bare")
    php, phb = r.profile_phases.get("proctor"), r.profile_phases.get("bare")
    cpu_p = php.proxy_us_per_req if php else None
    cpu_b = phb.proxy_us_per_req if phb else None
    if pp and pp.get("samples") and cpu_p:
        w(f"py-spy sampled the running proxy processes from outside (once per proxy, not repeated: {a['profile_seconds']:g} s each at 250 Hz, "
          f"non-blocking, so the target is never paused) while each served {a['connections']} connections at full "
          f"speed: Proctor {php.result.rps:,.0f} req/s with {cpu_p:.0f} µs of CPU per request ({pp['samples']:,} busy "
          "samples)" + (f", bare mitmproxy {phb.result.rps:,.0f} req/s with {cpu_b:.0f} µs ({pb['samples']:,} samples)"
                        if pb and cpu_b else "")
          + ". Each sample is attributed to one stage by its stack (`bench/spyprof.py` has the rules: Proctor's stage "
          "and addon frames anywhere on the stack win, so mitmproxy helpers called by Proctor count as Proctor; "
          "Proctor's engine patches, which replace methods deep inside mitmproxy's connection handling, count only "
          "where their own frame is the innermost). µs per request = share of busy samples × measured CPU per request.\n")
        w("| stage | bare mitmproxy (µs/req) | Proctor (µs/req) | share of Proctor's CPU |")
        w("|---|---:|---:|---:|")
        bshare = {row["category"]: row["share"] for row in (pb or {}).get("shares", [])}
        own = eng = 0.0
        for row in pp["shares"]:
            b = bshare.get(row["category"], 0.0)
            if row["share"] == 0 and b == 0:
                continue
            us_p = row["share"] / 100 * cpu_p
            if row["proctor"]:
                own += us_p
            else:
                eng += us_p
            b_txt = "—" if row["proctor"] else (f"{b / 100 * cpu_b:.0f}" if pb and cpu_b else "n/a")
            w(f"| {row['category']} | {b_txt} | {us_p:.0f} | {row['share']:.1f}% |")
        w("")
        w(f"Of Proctor's {cpu_p:.0f} µs per request, about {own:.0f} µs ({own / cpu_p:.0%}) is Proctor's own code and "
          f"{eng:.0f} µs the engine underneath (mitmproxy, asyncio, interpreter)"
          + (f", against {cpu_b:.0f} µs for the whole of bare mitmproxy. " if cpu_b else ". ")
          + (f"So the engine itself does ≈{eng - cpu_b:.0f} µs more per request under Proctor than under the no-op "
             "addon; likely causes are the larger request to parse (the JWT in `Proxy-Authorization`), the extra "
             "hooks with handlers (`requestheaders`, `responseheaders`), the header edits on request and response, "
             "and more objects per flow for the allocator and GC."
             if cpu_b and eng - cpu_b > 0.1 * cpu_b else
             "The engine's own cost is about the same as in bare mitmproxy." if cpu_b else ""))
        w("")
        w("Top functions by self time in Proctor (leaf frames):\n")
        for row in pp["top_self"][:8]:
            w(f"- {row['share']:.1f}% `{row['function']}`")
        w("")
    else:
        w("No process profile in this run (py-spy not installed or `--no-profile`): install it with "
          "`.venv/bin/pip install py-spy` and rerun."
          + (" The micro-benchmark below still shows Proctor's own stages." if r.micro else "") + "\n")

    mi = r.micro
    if not mi:
        return out
    import micro

    w("### Per-stage micro-benchmark (in-process)\n")
    w("`bench/micro.py` builds the same deployment with `proxy.server.build_runtime` and times each stage of one "
      "allowed request in a tight loop, in-process: no sockets and no mitmproxy event loop, so this is the floor of "
      f"Proctor's own cost per request. Best of 3 repeats, {a['micro_budget']:g} s per stage.\n")
    w(micro.format_table(mi) + "\n")
    by = {s["key"]: s["us"] for s in mi["stages"]}
    if mi.get("cprofile_decide_top"):
        w("cProfile of the chain's head and request phases (self time, 2,000 decisions):\n")
        for row in mi["cprofile_decide_top"][:6]:
            w(f"- {row['self_share']:.1f}% `{row['function']}`")
        w("")
    full, part, tiny, noctx = (by.get(k) for k in ("authorize.cedar", "cedar.partitioned", "cedar.tiny", "cedar.tiny.noctx"))
    w("### Reading the numbers\n")
    if full and part and tiny and by.get("decide"):
        n, k = mi["policies"], mi["partitioned_policies"]
        per_policy = (full - tiny) / max(1, n - 2)
        w(f"- **Cedar evaluation still dominates**, but Proctor no longer hands Cedar the whole set. "
          f"`PolicyStore.authorize` evaluates only the policies whose action scope can match the request "
          f"({k} of {n} for `bench.item.read`, because {k - 1} policies in the generated set have no action "
          f"constraint), with the context pruned to the attributes those policies read, and reuses merged entity "
          f"handles: {by.get('authorize', 0):.0f} µs per decision, against {full:.0f} µs for a plain "
          f"`cedarpy.is_authorized` over all {n} policies with the full context. Cedar's cost grows with the "
          f"policies it is given (≈{per_policy:.2f} µs each here), so a set whose policies constrain their action "
          f"costs far less than this benchmark's, which deliberately leaves {(k - 1) / n:.0%} of them unscoped.")
        if noctx:
            w(f"- The fixed part of one Cedar call is ≈{tiny:.0f} µs with Proctor's full context and ≈{noctx:.0f} µs "
              "with an empty one: building the request context (nested records, `datetime` and `ip` extension "
              "values) inside cedarpy is what context pruning saves.")
    rest = sum(by.get(k, 0) for k in ("adapter", "auth", "classify", "body", "context", "decision_id", "record"))
    w(f"- Everything else Proctor does per request — the `AgentRequest` from the flow "
      f"({by.get('adapter', 0):.0f} µs), the JWT cache lookup ({by.get('auth', 0):.0f} µs), classification "
      f"({by.get('classify', 0):.0f} µs), the Cedar input dicts ({by.get('context', 0):.0f} µs), the decision id and "
      f"the decision record with its OCSF audit event ({by.get('record', 0):.0f} µs) — adds up to about {rest:.0f} µs.")
    w("")
    w("### Done, and what is left\n")
    w("Done (each measured with this script; decisions unchanged, see `tests/test_policy_index_unit.py`, which "
      "compares 1,500 random requests against whole-set evaluation):")
    w("1. Policies partitioned by action at load (`proxy/policy/index.py`); each part keyed by `@id`, so Cedar "
      "reports `@id`s directly. Action groups in the schema make `action in` constraints go to every part "
      "(resolved at runtime by Cedar), so grouping never loses a policy.")
    w("2. Context pruned per part to the paths its policies read, nested records included (`context.time.hour` "
      "keeps only `time.hour`, `context has x` keeps `x`); a policy that uses `context` as a whole value disables "
      "pruning for its part.")
    w("3. Merged `cedarpy.Entities` handles cached by (revision, principal, resource) content; header copy in one pass; "
      "peer-IP normalisation cached.")
    w("")
    w("Before these, a single run of the same benchmark (before it had `--repeats`) measured 43% of bare "
      "mitmproxy's throughput and +1.6 ms median latency (617 vs 1,420 req/s).")
    w("")
    if tg_cpu_b := targets(r).get("cpu_bare_us"):
        budget = tg_cpu_b * (1 / TARGET_THROUGHPUT_RATIO - 1)
        w(f"Left: {TARGET_THROUGHPUT_RATIO:.0%} of bare mitmproxy's throughput leaves ≈{budget:.0f} µs of CPU per request for Proctor on this "
          f"machine, less than one small Cedar call ({tiny or 0:.0f} µs) plus Proctor's other per-request work "
          f"(≈{rest:.0f} µs), so the throughput target is out of reach for an in-process, single-threaded Cedar on "
          f"this engine. cedarpy {r.machine.get('cedarpy', '')}'s `is_authorized` holds the GIL, so a thread pool "
          "does not help. Candidates, in order of expected gain: slicing parts further by principal scope "
          "(`principal == ...`, `principal in Group`), memoising decisions keyed by the exact pruned Cedar request (exact by "
          "construction, but it only pays off for repeated identical requests), and running several engine "
          "processes behind `SO_REUSEPORT` to use more cores.")
    w("")
    return out


# Sections other benchmarks append to performance.md (bench/held.py, bench/audit.py, bench/coordination.py):
# this run replaces everything before the first of them and keeps them.
KEPT_SECTIONS = ("## Stage chain: before and after", "## Hardening cost: before and after", "## Audit trail and tracing cost", "## 10,000 requests held for approval", "## Coordination cost")


def merge_docs(path: Path, rendered: str) -> str:
    try:
        old = path.read_text()
    except OSError:
        return rendered
    starts = [old.find(h) for h in KEPT_SECTIONS if old.find(h) >= 0]
    if not starts:
        return rendered
    return rendered.rstrip() + "\n\n" + old[min(starts):].lstrip()


def render_markdown(r: Run, command: str) -> str:
    m, a, tg = r.machine, r.args, targets(r)
    lay = r.layout
    if lay["proxy"]:
        layout_text = (
            f"processes pinned with `taskset`: proxy under test on CPU {lay['proxy']}, upstream on CPU {lay['upstream']}, "
            f"load generator on CPU {lay['client']} (for `direct`, where no proxy runs, the load generator uses "
            f"CPU {lay['direct_client']})"
        )
    else:
        layout_text = "no CPU pinning (`--no-pin`, fewer than 2 CPUs, or no `taskset`)"
    gen_text = (
        f"`wrk` ({m['wrk']}) with `bench/proxy.lua` (absolute-form request line, `Host` and "
        "`Proxy-Authorization: Bearer <jwt>` on every request through a proxy)"
        if r.generator == "wrk"
        else f"the Python fallback `bench/loadgen.py` ({a['py_procs']} worker processes of raw asyncio keep-alive "
        "connections; " + ("selected with `--generator python`" if loadgen.have_wrk() else "wrk was not installed")
        + "). Its own per-request overhead adds tens of µs to every latency figure, "
        "the same for each configuration"
    )
    met = lambda ok: "**met**" if ok else "**not met**"
    other_cores = max((p.other_cores for p in r.phases), default=0.0)
    tag = lambda p: f"{p.config}/{p.kind}" + (f" #{p.repeat}" if p.repeat else "")
    retried = [tag(p) for p in r.phases if p.retried]
    still = [f"{tag(p)} ({p.other_cores:.2f} cores)" for p in r.phases if p.other_cores > a["noise_threshold"]]
    noise = (
        f"Other processes on the machine used at most {other_cores:.2f} CPU cores during any measured phase "
        "(column *other processes* below)"
        + (f"; phases retried once because the first attempt was noisy (the cleaner attempt is the one kept and shown): "
           f"{', '.join(retried)}" if retried else "")
        + (f"; kept phases still above the {a['noise_threshold']:g}-core noise threshold: {', '.join(still)}" if still else "")
        + (". The machine was shared while this ran: treat small differences with care." if other_cores > 0.1 else ".")
    )
    out: list[str] = []
    w = out.append
    w("# Performance\n")
    w("How fast Proctor's request path is, measured against a bare mitmproxy running Proctor's own engine "
      "configuration, and where the time goes: the forward proxy first, then gateway (reverse) mode on both "
      "gateway engines (*Gateway mode*). Everything on this page up to *Reproducing* is produced by `bench/run.py`; "
      "rerun it to refresh the numbers (they are machine-specific).\n")
    w("## Run\n")
    same = " (what `make bench` runs)" if command.strip() == "python bench/run.py" else " (`make bench` runs it without options)"
    w(f"- Command: `{command}`{same}")
    w(f"- Date: {r.started}; the whole run took {r.elapsed_s:.0f} s")
    w(f"- Machine: {m['cpu']}, {m['cores']} CPUs, {m['ram']} RAM, {m['os']}; load average at start {' '.join(m['loadavg'])}")
    w(f"- Software: Python {m['python']}, mitmproxy {m['mitmproxy']}, cedarpy {m['cedarpy']}, "
      f"PyJWT {m['pyjwt']}, aiohttp {m['aiohttp']}")
    w(f"- Load generator: {gen_text}")
    w(f"- CPU layout: {layout_text}")
    w(f"- {noise}\n")
    n = r.repeats
    w("## Results\n")
    if n > 1:
        w(f"Run-to-run variation on a small VM is large (single runs of this script have differed by several points of "
          f"throughput ratio and by tenths of a millisecond of median latency), so bare mitmproxy and Proctor are each "
          f"measured {n} times (`--repeats {n}`). Each cell is the **median across the repeats**, with the min–max range "
          "in parentheses; *runs* is how many phases of each kind the row summarises (direct, the ceiling, runs once). "
          "Per-repeat values are under *Against the targets* and *All phases*.\n")
    w(results_table(r) + "\n")
    interleave = (
        f" Direct runs once; bare mitmproxy and Proctor run {n} times each, interleaved (bare, Proctor, bare, Proctor, …), "
        "so slow drift in the VM's speed affects both alike and each Proctor phase is paired with the bare phase "
        "just before it." if n > 1 else " Each configuration runs once (`--repeats 1`)."
    )
    w(f"Max throughput: {a['connections']} keep-alive connections, closed loop (each sends its next request as soon "
      f"as the previous response is complete), {a['duration']:g} s per phase after a {a['warmup']:g} s warm-up."
      + interleave + "\n")
    w(f"Latency at moderate load: {a['latency_connections']} keep-alive connections, each pausing a random think "
      f"time after every response (exponentially distributed, mean {r.think_ms['forward']:g} ms, so arrivals are Poisson-like "
      "and the connections never fall into lock-step bursts), i.e. about "
      f"{r.moderate_target_rps['forward']:,.0f} req/s offered to every configuration — "
      f"{a['moderate_fraction'] * 100:.0f}% of the slowest proxy's {'median ' if n > 1 else ''}measured maximum, "
      "chosen automatically (`--think-ms` fixes it), so every proxy is well below saturation. "
      f"{a['latency_duration']:g} s per phase after a 1 s warm-up"
      + (", with the same order as above (all throughput phases run first)" if n > 1 else "")
      + ". Latency is from writing the request to reading the last byte of the response; think time is not included.\n")
    w("Every request in every phase is `GET /items/1` on the upstream; through Proctor it is classified as "
      f"`bench.item.read` on `Item::\"1\"` and evaluated against {r.policy_stats.get('policies', '?')} Cedar policies "
      f"({r.policy_stats.get('permits', '?')} permits, {r.policy_stats.get('forbids', '?')} forbids, "
      f"{r.policy_stats.get('unscoped_action', '?')} with an unscoped action, generated by `bench/policygen.py`), "
      "the agent authenticated by an ES256 JWT from a JWKS-file issuer (verified once, then served from the "
      "verified-token cache), and one decision record line is written per request. Through Proctor each request "
      "carries `Proxy-Authorization: Bearer <jwt>` (which Proctor strips before forwarding); the `direct` and `bare` "
      "requests are the same GET without it.\n")
    w("## Against the targets\n")
    nt, nl = tg["n_throughput"], tg["n_latency"]
    if n > 1:
        w(f"Each repeat pairs a bare mitmproxy phase with the Proctor phase run right after it. The verdicts use the "
          f"**median of the {nt} per-repeat throughput ratios** (Proctor / bare) and the **median of the {nl} per-repeat "
          "added p50s** (Proctor p50 − bare p50) — not the ratio or difference of the medians in the table above, "
          "which can differ slightly — and each line also says in how many repeats the target was met on its own.\n")
    sgn = lambda v: f"{v:+.3f}"
    tp_spread = (f" (median of {nt} repeats; per repeat {tg['throughput_ratio_min']:.1%} to {tg['throughput_ratio_max']:.1%})"
                 if nt > 1 else "")
    p50_spread = (f"median of {nl} repeats; per repeat {sgn(tg['added_p50_min_ms'])} to {sgn(tg['added_p50_max_ms'])} ms; "
                  if nl > 1 else "")
    w(f"- Full-pipeline throughput at least {TARGET_THROUGHPUT_RATIO:.0%} of bare mitmproxy: "
      f"{tg['throughput_ratio']:.1%}{tp_spread} — {met(tg['throughput_met'])}"
      + (f"; met in {tg['throughput_met_count']} of {nt} repeats." if nt > 1 else "."))
    w(f"- Added median latency under {TARGET_ADDED_P50_MS:g} ms over bare mitmproxy at moderate load: "
      f"{sgn(tg['added_p50_ms'])} ms ({p50_spread}p90 {sgn(tg['added_p90_ms'])} ms, p99 {sgn(tg['added_p99_ms'])} ms"
      + (", also medians of the per-repeat differences" if nl > 1 else "") + ") — "
      f"{met(tg['added_p50_met'])}" + (f"; met in {tg['added_p50_met_count']} of {nl} repeats." if nl > 1 else "."))
    if tg["cpu_added_us"] is not None:
        w(f"- Proxy CPU per request at max throughput{' (medians across repeats)' if nt > 1 else ''}: bare mitmproxy "
          f"{tg['cpu_bare_us']:.0f} µs, Proctor {tg['cpu_proctor_us']:.0f} µs, so Proctor adds "
          f"{tg['cpu_added_us']:.0f} µs of CPU per request (throughput of a single-threaded proxy is the inverse of this).")
        budget = tg["cpu_bare_us"] * (1 / TARGET_THROUGHPUT_RATIO - 1)
        w(f"- What the throughput target leaves for Proctor: at {TARGET_THROUGHPUT_RATIO:.0%} of bare mitmproxy's "
          f"throughput Proctor may add at most {budget:.0f} µs of CPU per request on this machine "
          f"({1 / TARGET_THROUGHPUT_RATIO - 1:.1%} of bare mitmproxy's {tg['cpu_bare_us']:.0f} µs); it adds "
          f"{tg['cpu_added_us']:.0f} µs.")
    lb, lp = tg["lat_cpu_bare_us"], tg["lat_cpu_proctor_us"]
    if lb and lp:
        w(f"- At moderate load the proxies used {lb:.0f} µs (bare) and {lp:.0f} µs (Proctor) of CPU per request"
          + (" (medians across repeats)" if nl > 1 else "")
          + f" — more than at saturation, where work is batched per event-loop pass — so Proctor's service time alone "
          f"is ≈{(lp - lb) / 1000:.2f} ms longer per request, which is what the added median latency mostly is.")
    if not tg["valid"]:
        w("- **Some phase saw non-2xx responses or socket errors: those numbers are not valid measurements.**")
    w("")
    if n > 1:
        w("Per repeat (the values the verdicts are computed from; the last row holds the medians and how many repeats "
          "met each target):\n")
        w(repeats_table(r) + "\n")
    w("Checks before measuring (the benchmark refuses to run if any fails):\n")
    for line in r.preflight:
        w(f"- {line}")
    pst = r.proctor_stats.get("proctor", {})
    st = pst.get("engine", {})
    if st:
        w(f"\nProctor's own counters after the run: {st.get('requests', 0):,} requests, {st.get('allowed', 0):,} allowed, "
          f"{st.get('refused', 0):,} refused (the pre-flight's DELETE and token-less request), "
          f"{pst.get('records_written', 0):,} decision records written.")
    w("\n### All phases\n")
    w("In the order they ran, both modes (gateway mode: the *bare_gw*, *gw_aiohttp* and *gw_mitm* rows, see "
      "*Gateway mode* below): one row per phase, and per repeat for the proxies (*repeat*; *once* "
      "for phases that run a single time).\n")
    w(detail_table(r) + "\n")
    w("*proxy CPU per request* is the proxy process's user+system CPU time during the phase divided by the "
      "responses received. *other processes* is the machine's user+system CPU time during the phase minus that of "
      "the benchmark's own processes, as average cores: non-zero means something else competed for the CPUs "
      f"(a phase above {a['noise_threshold']:g} cores is retried once, after waiting for quiet, and the cleaner attempt "
      f"kept; at most {a['max_retries']} retries per run). In the profile phase it includes py-spy itself.\n")

    out.extend(render_gateway(r))
    out.extend(render_cost(r))
    w("## Reproducing\n")
    w("```\nmake bench                         # or: .venv/bin/python bench/run.py\n"
      ".venv/bin/python bench/run.py --help   # modes, repeats, durations, connections, think time, --no-write-docs\n"
      ".venv/bin/python bench/run.py --modes gateway --repeats 1 --no-profile --no-micro   # gateway mode alone\n"
      ".venv/bin/python bench/micro.py        # the per-stage micro-benchmark alone\n```\n")
    w("`wrk` is used when it is on `PATH` (`apt-get install wrk`), otherwise the Python load generator; "
      "py-spy (`.venv/bin/pip install py-spy`) enables the process profile. Only loopback addresses are used, "
      "every load phase is bounded in time, and every process the benchmark starts is stopped at the end.")
    return "\n".join(out) + "\n"


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)} (comma-separated); got {text!r}")
    return [m for m in MODES if m in modes]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto",
                    help="load generator (auto: wrk if installed, else Python)")
    ap.add_argument("--modes", type=_modes, default=list(MODES),
                    help="comma-separated: forward (direct, bare mitmproxy, Proctor as a forward proxy) and/or gateway "
                         "(bare reverse mitmproxy, Proctor's gateway on the aiohttp and on the mitmproxy engine); "
                         "default both. docs/performance.md is only rewritten by a run of both")
    ap.add_argument("--repeats", type=int, default=3,
                    help="run the bare and proctor throughput and latency phases this many times each, interleaved "
                         "(bare, proctor, bare, ...); results are medians and verdicts use the median of the per-repeat "
                         "values (default 3; direct, the profile and the micro-benchmark run once)")
    ap.add_argument("--duration", type=float, default=10, help="seconds per max-throughput phase")
    ap.add_argument("--connections", type=int, default=64, help="connections for max throughput")
    ap.add_argument("--warmup", type=float, default=2, help="seconds of warm-up before each throughput phase")
    ap.add_argument("--latency-duration", type=float, default=10, help="seconds per moderate-load latency phase")
    ap.add_argument("--latency-connections", type=int, default=4, help="connections at moderate load")
    ap.add_argument("--think-ms", type=float, default=None,
                    help="mean per-connection pause after each response at moderate load (default: derived from "
                         "--moderate-fraction of the slowest proxy's max throughput)")
    ap.add_argument("--moderate-fraction", type=float, default=0.25,
                    help="moderate load as a fraction of the slowest proxy's max throughput (default 0.25)")
    ap.add_argument("--policies", type=int, default=500, help="size of the generated Cedar policy set")
    ap.add_argument("--py-procs", type=int, default=2, help="worker processes of the Python load generator")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--noise-threshold", type=float, default=0.15,
                    help="a phase during which other processes used more CPU cores than this is noisy")
    ap.add_argument("--retry-noisy", type=int, choices=[0, 1], default=1,
                    help="retry a noisy phase once and keep the cleaner attempt (default 1)")
    ap.add_argument("--max-retries", "--max-repeats", dest="max_retries", type=int, default=None,
                    help="at most this many noisy phases are retried per run (default: max(3, 2 x --repeats); "
                         "--max-repeats is the old name)")
    ap.add_argument("--wait-quiet", type=float, default=10,
                    help="before measuring, wait up to this many seconds for other processes to go quiet")
    ap.add_argument("--quiet-wait", type=float, default=5,
                    help="before retrying a noisy phase, wait up to this many seconds for quiet")
    ap.add_argument("--no-profile", action="store_true", help="skip the py-spy profile of Proctor")
    ap.add_argument("--profile-seconds", type=float, default=5, help="py-spy sampling time per proxy")
    ap.add_argument("--no-micro", action="store_true", help="skip the in-process micro-benchmark")
    ap.add_argument("--micro-budget", type=float, default=0.3, help="seconds of timing per micro-benchmark stage")
    ap.add_argument("--write-docs", dest="write_docs", action="store_true", default=True,
                    help="write docs/performance.md (default)")
    ap.add_argument("--no-write-docs", dest="write_docs", action="store_false")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "performance.md")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temporary deployment directory (logs, profile)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.max_retries is None:
        args.max_retries = max(3, 2 * args.repeats * len(args.modes))
    args._retries_left = args.max_retries

    r = run(args)
    forward = "forward" in r.modes
    tg = targets(r)
    if forward:
        print("\n" + results_table(r))
    if forward and r.repeats > 1:
        print("\n" + repeats_table(r))
    if forward:
        print_forward_verdicts(tg)
    if "gateway" in r.modes:
        g = gateway_targets(r)
        print("\ngateway mode:\n" + gateway_table(r))
        if r.repeats > 1:
            print("\n" + gateway_repeats_table(r))
        if g["ratio"] is not None:
            print(f"\naiohttp gateway / bare reverse mitmproxy throughput: {g['ratio']:.2f}x "
                  + (f"(median of {g['n']}; {g['ratio_min']:.2f}x to {g['ratio_max']:.2f}x) " if g["n"] > 1 else "")
                  + f"(goal >= {TARGET_GATEWAY_RATIO:g}x: {'met' if g['met'] else 'NOT met'})")
    for name, prof in r.profiles.items():
        ph = r.profile_phases.get(name)
        cpu = ph.proxy_us_per_req if ph else None
        print(f"\n{name} CPU by stage (py-spy, {prof['samples']} samples, {fmt(cpu, 0)} µs CPU/request):")
        for row in prof["shares"]:
            if row["share"] > 0:
                us = f"{row['share'] / 100 * cpu:6.0f} µs" if cpu else ""
                print(f"  {row['share']:5.1f}%  {us}  {row['category']}")
    valid = all(p.valid for p in r.phases)
    if not valid:
        print("\nWARNING: non-2xx responses or socket errors were seen; see the phase details")
    print(f"\nload generator used: {r.generator}; total time {r.elapsed_s:.0f} s")

    command = "python bench/run.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    if args.json:
        args.json.write_text(json.dumps({
            "machine": r.machine, "generator": r.generator, "layout": r.layout, "preflight": r.preflight,
            "phases": [p.as_dict() for p in r.phases] + [p.as_dict() for p in r.profile_phases.values()],
            "targets": tg if forward else None, "gateway": gateway_targets(r) if "gateway" in r.modes else None,
            "profiles": r.profiles, "micro": r.micro, "proctor_stats": r.proctor_stats,
            "think_ms": r.think_ms, "started": r.started, "repeats": r.repeats, "modes": r.modes,
        }, indent=2, default=str))
    if args.write_docs and r.modes != list(MODES):
        print(f"not writing {args.docs}: it holds a run of every mode (this one ran {', '.join(r.modes)})")
    elif args.write_docs:
        args.docs.parent.mkdir(parents=True, exist_ok=True)
        args.docs.write_text(merge_docs(args.docs, render_markdown(r, command.strip())))
        print(f"wrote {args.docs}")
    return 0 if valid else 1


def print_forward_verdicts(tg: dict) -> None:
    nt, nl = tg["n_throughput"], tg["n_latency"]
    print(f"\nthroughput Proctor / bare mitmproxy: {tg['throughput_ratio']:.1%} "
          + (f"(median of {nt}; {tg['throughput_ratio_min']:.1%} to {tg['throughput_ratio_max']:.1%}) " if nt > 1 else "")
          + f"(target >= {TARGET_THROUGHPUT_RATIO:.0%}: {'met' if tg['throughput_met'] else 'NOT met'}"
          + (f"; met in {tg['throughput_met_count']} of {nt} repeats)" if nt > 1 else ")"))
    print(f"added p50 latency over bare mitmproxy: {tg['added_p50_ms']:+.3f} ms "
          + (f"(median of {nl}; {tg['added_p50_min_ms']:+.3f} to {tg['added_p50_max_ms']:+.3f}) " if nl > 1 else "")
          + f"(target < {TARGET_ADDED_P50_MS:g} ms: {'met' if tg['added_p50_met'] else 'NOT met'}"
          + (f"; met in {tg['added_p50_met_count']} of {nl} repeats)" if nl > 1 else ")"))
    if tg["cpu_added_us"] is not None:
        print(f"proxy CPU per request (median): bare {tg['cpu_bare_us']:.0f} µs, proctor {tg['cpu_proctor_us']:.0f} µs")


if __name__ == "__main__":
    sys.exit(main())
