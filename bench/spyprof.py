"""Sample a running proxy with py-spy and attribute its CPU to request-path stages.

py-spy (`pip install py-spy`) samples the real `proctor run` process from the
outside while it is under load, so the shares include mitmproxy's own work
(HTTP/1 parsing, layers, addon dispatch, asyncio and socket I/O), which the
in-process micro-benchmark cannot see. Samples are taken with --nonblocking
(the target is never paused); idle samples (the event loop waiting in epoll)
are not collected, so shares are of *busy* CPU time.

Each sample's stack is assigned to one category. Proctor frames anywhere on
the stack win over mitmproxy/asyncio frames (a mitmproxy helper called from
Proctor code is Proctor's cost); among Proctor categories the first matching
rule below wins.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

# (category, predicate over the list of frames "func (file:line)")
# A Proctor request-path frame (not mitmproxy/proxy/..., and not the cli.py/server.py
# entry frames that sit at the bottom of every stack).
_P = r"\(proxy/(core|engine|identity|connectors|policy|record)/"


def _any(frames: list[str], *needles: str) -> bool:
    return any(n in f for f in frames for n in needles)


def _re(frames: list[str], pattern: str) -> bool:
    rx = re.compile(pattern)
    return any(rx.search(f) for f in frames)


CATEGORIES: list[tuple[str, object]] = [
    ("Cedar evaluation (cedarpy.is_authorized: request/context JSON + policy evaluation in Rust)",
     lambda fr: _any(fr, "is_authorized (cedarpy", "is_authorized_batch (cedarpy")),
    ("Cedar entities delta (json.dumps + Entities.with_added_json_str)",
     lambda fr: _any(fr, "with_added_json_str") or (_any(fr, "PolicyStore.authorize") and _any(fr, "(json/"))),
    ("Policy wrapper (PolicyStore.authorize: reasons/errors mapping)", lambda fr: _any(fr, "PolicyStore.authorize")),
    ("Identity (credential parsing + JWT cache lookup)",
     lambda fr: _any(fr, "TokenVerifier.verify", "extract_credential", "Pipeline.authenticate")),
    ("Classification (connector route match, path normalisation)",
     lambda fr: _any(fr, "Classifier.classify", "normalise_path", "(proxy/connectors/")),
    ("Cedar input building (principal/resource/context dicts)",
     lambda fr: _any(fr, "request_context", "principal_entity", "resource_entity", "parse_json_body", "to_cedar")),
    ("Decision record (dict + json.dumps + write(2))",
     lambda fr: _any(fr, "decision_record", "DecisionRecorder.write", "ProctorAddon._record")),
    ("Decision id (time + uuid4)", lambda fr: _any(fr, "new_decision_id")),
    ("AgentRequest build in the adapter (headers to dict, IP normalisation)",
     lambda fr: _any(fr, "ProctorAddon._agent_request", "_headers (proxy/engine", "normalise_ip")),
    ("Other Proctor code (addon hooks, pipeline glue, header edits)", lambda fr: _re(fr, _P)),
    ("mitmproxy HTTP/1 parsing and serialisation",
     lambda fr: _any(fr, "(mitmproxy/net/http", "_http1.py", "(mitmproxy/http.py", "(mitmproxy/coretypes/")),
    ("mitmproxy addon dispatch (hooks for all addons)", lambda fr: _any(fr, "(mitmproxy/addonmanager", "(mitmproxy/addons/")),
    ("mitmproxy proxy layers, connection handling, flow objects", lambda fr: _any(fr, "(mitmproxy/")),
    ("asyncio event loop and socket I/O", lambda fr: _any(fr, "(asyncio/", "(selectors", "socket")),
]
OTHER = "Other (interpreter, GC, unattributed)"
# The first N categories are Proctor's own code; the rest is the engine underneath.
PROCTOR_CATEGORIES = {name for name, _ in CATEGORIES[:10]}


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


def categorise(raw: Path) -> dict:
    """Shares of busy samples per category, plus the top self-time functions."""
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
        for name, pred in CATEGORIES:
            if pred(frames):  # type: ignore[operator]
                counts[name] += n
                break
        else:
            counts[OTHER] += n
        leaf[frames[-1] if frames else "?"] += n
    shares = [(name, counts[name] / total * 100 if total else 0.0) for name, _ in CATEGORIES + [(OTHER, None)]]
    return {
        "samples": total,
        "shares": [{"category": c, "share": round(s, 2), "proctor": c in PROCTOR_CATEGORIES} for c, s in shares],
        "top_self": [{"function": f, "share": round(n / total * 100, 1)} for f, n in leaf.most_common(10)] if total else [],
    }


if __name__ == "__main__":
    import json

    print(json.dumps(categorise(Path(sys.argv[1])), indent=2))
