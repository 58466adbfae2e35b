"""Sample a running proxy with py-spy and attribute its CPU to request-path stages.

py-spy (`pip install py-spy`) samples the real `proctor run` process from the
outside while it is under load, so the shares include mitmproxy's own work
(HTTP/1 parsing, layers, addon dispatch, asyncio and socket I/O), which the
in-process micro-benchmark cannot see. Samples are taken with --nonblocking
(the target is never paused); idle samples (the event loop waiting in epoll)
are not collected, so shares are of *busy* CPU time.

Each sample's stack is assigned to one category, by the first rule that
matches in the engine's list (`categories(engine)`). Proctor's stage frames
anywhere on the stack win over engine frames (a library helper called from a
stage is that stage's cost). Then, for the mitmproxy engine, Proctor's addon
(proxy/engine/mitm.py) anywhere wins over mitmproxy, while Proctor's engine
patches (proxy/engine/patches.py), which replace methods deep inside mitmproxy's
connection handling and so sit below most of its work, count only where their
frame is the innermost of theirs and mitmproxy's; for the aiohttp gateway engine, whose
adapter calls the library (the upstream client, the response objects), the
client and the answer-writing frames anywhere win over the adapter; then the
innermost of the adapter's and aiohttp's frames decides between the adapter's own
code and aiohttp's server (which sits below every handler frame, and under the
adapter's `data_received` override).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

Predicate = Callable[[list[str]], bool]

# A frame of Proctor's stages and chain (not the engine adapters in proxy/engine/, and
# not the cli.py/server.py entry frames that sit at the bottom of every stack).
_STAGE_CODE = r"\(proxy/(core|identity|connectors|policy|record|audit|observability|governance|approvals|store)/" \
              r"|\(proxy/request_path\.py"


def _any(frames: list[str], *needles: str) -> bool:
    return any(n in f for f in frames for n in needles)


def _re(frames: list[str], pattern: str) -> bool:
    rx = re.compile(pattern)
    return any(rx.search(f) for f in frames)


def _deepest(frames: list[str], *needles: str) -> int:
    """Index of the innermost frame containing any needle (-1: none)."""
    return next((i for i in range(len(frames) - 1, -1, -1) if any(n in frames[i] for n in needles)), -1)


def _adapter_innermost(frames: list[str]) -> bool:
    """The aiohttp adapter's own code: its frame is inside every aiohttp frame on the stack (what
    the adapter calls into aiohttp is aiohttp's; aiohttp's server calling the handler is not)."""
    own = _deepest(frames, "(proxy/engine/")
    return own >= 0 and own > _deepest(frames, "(aiohttp/")


def _patches_innermost(frames: list[str]) -> bool:
    """Proctor's engine patches' own code. They replace methods deep in mitmproxy's connection
    handling (the connection handler, header and body reading), so a patch frame sits below
    most of mitmproxy's work: only what runs inside the patch itself is the patch's."""
    own = _deepest(frames, "(proxy/engine/patches.py")
    return own >= 0 and own > _deepest(frames, "(mitmproxy/", "(h11/")


def _mitm_addon(frames: list[str]) -> bool:
    """Proctor's mitmproxy addon and what it calls (mitmproxy helpers included)."""
    return any("(proxy/engine/" in f and "(proxy/engine/patches.py" not in f for f in frames)


# The engine adapters turning the engine's request into an AgentRequest (mitm.py and
# aiohttp_gateway.py both name these `_agent_request` and `_headers`).
_REQUEST_BUILD = r"^(\w+\.)?_agent_request \(proxy/engine/|^_headers(\.<locals>\.\S+)? \(proxy/engine/"


# (category, predicate over the list of frames "func (file:line)"), first match wins.
STAGE_CATEGORIES: list[tuple[str, Predicate]] = [
    ("Cedar evaluation (cedarpy.is_authorized: request/context JSON + policy evaluation in Rust)",
     lambda fr: _any(fr, "is_authorized (cedarpy", "is_authorized_batch (cedarpy")),
    ("Cedar entities delta (json.dumps + Entities.with_added_json_str)",
     lambda fr: _any(fr, "with_added_json_str") or (_any(fr, "PolicyStore.authorize") and _any(fr, "(json/"))),
    ("Cedar input building (principal/resource/context dicts)",
     lambda fr: _any(fr, "request_context", "principal_entity", "resource_entity", "parse_json_body", "to_cedar")),
    ("Policy wrapper (authorize stage, PolicyStore.authorize: reasons/errors mapping)",
     lambda fr: _any(fr, "(proxy/policy/")),
    ("Identity (credential parsing + JWT cache lookup)", lambda fr: _any(fr, "(proxy/identity/")),
    ("Classification (connector route match, path normalisation, body values)",
     lambda fr: _any(fr, "(proxy/connectors/")),
    ("Decision record + OCSF audit event (build, redact, chain hash, JSON, write(2))",
     lambda fr: _any(fr, "(proxy/record/", "(proxy/audit/")),
    ("Metrics and tracing stages", lambda fr: _any(fr, "(proxy/observability/")),
    ("Decision id (time + uuid4)", lambda fr: _any(fr, "new_decision_id")),
    (REQUEST_BUILD := "Request build in the engine adapter (headers to dict, IP normalisation)",
     lambda fr: _re(fr, _REQUEST_BUILD) or _any(fr, "normalise_ip")),
    ("Chain runner, the other stages, background tasks (target check, suspension poll, approval timers)",
     lambda fr: _re(fr, _STAGE_CODE)),
]
_ASYNCIO: tuple[str, Predicate] = (
    "asyncio event loop and socket I/O", lambda fr: _any(fr, "(asyncio/", "(selectors", "socket"))
MITMPROXY_CATEGORIES: list[tuple[str, Predicate]] = [
    (MITM_ADAPTER := "Proctor's mitmproxy addon (hooks, header edits, the mitmproxy helpers it calls)", _mitm_addon),
    (MITM_PATCHES := "Proctor's engine patches, their own code (proxy/engine/patches.py: bounded heads and bodies, timeouts)",
     _patches_innermost),
    ("mitmproxy HTTP/1 parsing and serialisation",
     lambda fr: _any(fr, "(mitmproxy/net/http", "_http1.py", "(mitmproxy/http.py", "(mitmproxy/coretypes/")),
    ("mitmproxy addon dispatch (hooks for all addons)", lambda fr: _any(fr, "(mitmproxy/addonmanager", "(mitmproxy/addons/")),
    ("mitmproxy proxy layers, connection handling, flow objects", lambda fr: _any(fr, "(mitmproxy/")),
    _ASYNCIO,
]
AIOHTTP_CATEGORIES: list[tuple[str, Predicate]] = [
    ("aiohttp client: upstream request, connection pool, response parsing",
     lambda fr: _any(fr, "(aiohttp/client", "(aiohttp/connector.py")),
    ("aiohttp server: building and writing the answer (web_response, http_writer)",
     lambda fr: _any(fr, "(aiohttp/web_response.py", "(aiohttp/http_writer.py")),
    (AIOHTTP_ADAPTER := "Gateway adapter's own code (proxy/engine/aiohttp_gateway.py: routing, header copies, relay)",
     _adapter_innermost),
    ("aiohttp server: connection protocol, request parsing, handler dispatch", lambda fr: _any(fr, "(aiohttp/")),
    _ASYNCIO,
]
OTHER = "Other (interpreter, GC, unattributed)"
# Categories that are Proctor's own code (stages, chain, engine adapters); the rest is
# the engine underneath (mitmproxy or aiohttp, asyncio, the interpreter).
PROCTOR_CATEGORIES = {name for name, _ in STAGE_CATEGORIES} | {MITM_ADAPTER, MITM_PATCHES, AIOHTTP_ADAPTER}
# Of those, the engine adapters' own code (not a stage).
ADAPTER_CATEGORIES = {REQUEST_BUILD, MITM_ADAPTER, MITM_PATCHES, AIOHTTP_ADAPTER}


def categories(engine: str = "mitmproxy") -> list[tuple[str, Predicate]]:
    """The rules for a process whose HTTP engine is `engine` ("mitmproxy" or "aiohttp")."""
    return STAGE_CATEGORIES + (AIOHTTP_CATEGORIES if engine == "aiohttp" else MITMPROXY_CATEGORIES)


def have_pyspy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


def record(pid: int, seconds: float, out: Path, rate: int = 250, cpus: list[int] | None = None) -> subprocess.Popen:
    """Start py-spy recording `pid` for `seconds` into `out` (collapsed stacks); returns the process."""
    exe = have_pyspy()
    assert exe, "py-spy is not installed"
    cmd = [exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(rate), "--nonblocking",
           "-f", "raw", "-o", str(out)]
    if cpus:
        cmd = ["taskset", "-c", ",".join(map(str, cpus)), *cmd]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def categorise(raw: Path, engine: str = "mitmproxy") -> dict:
    """Shares of busy samples per category, plus the top self-time functions."""
    rules = categories(engine)
    counts: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, _, n_text = line.rpartition(" ")
        try:
            n = int(n_text)
        except ValueError:
            continue
        frames = [f for f in stack.split(";") if f]
        total += n
        for name, pred in rules:
            if pred(frames):
                counts[name] += n
                break
        else:
            counts[OTHER] += n
        leaf[frames[-1] if frames else "?"] += n
    names = [name for name, _ in rules] + [OTHER]
    shares = [(name, counts[name] / total * 100 if total else 0.0) for name in names]
    return {
        "samples": total,
        "shares": [{"category": c, "share": round(s, 2), "proctor": c in PROCTOR_CATEGORIES} for c, s in shares],
        "top_self": [{"function": f, "share": round(n / total * 100, 1)} for f, n in leaf.most_common(10)] if total else [],
    }


if __name__ == "__main__":
    import json

    # python bench/spyprof.py RAW [mitmproxy|aiohttp]
    print(json.dumps(categorise(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "mitmproxy"), indent=2))
