"""`proctor audit verify FILE...` and `proctor audit tail`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from ..cli_common import CONFIG_HELP, load_config_or_exit


@click.group()
def audit() -> None:
    """The OCSF audit trail: verify its hash chain, follow it."""


@audit.command("verify")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False))
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def verify_cmd(files: tuple[str, ...], config_path: str | None, as_json: bool) -> None:
    """Check the hash chain of an audit trail: report every modified, deleted or
    reordered event and where it is.

    Give the files oldest first (rotated files, then the current one); with no
    FILES, the configured audit file and its rotated predecessors are checked.

    Exit status: 0 intact, 1 tampering found, 2 unusable input."""
    from .chain import verify

    if files:
        paths = [Path(f) for f in files]
    else:
        config = load_config_or_exit(config_path)
        current = config.audit_path
        if current is None:
            click.echo("error: no audit file is configured (audit.file)", err=True)
            sys.exit(2)
        rotated = sorted(current.parent.glob(f"{current.stem}-*{current.suffix}"))
        paths = rotated + [current]
    missing = [p for p in paths if not p.exists()]
    if missing:
        click.echo(f"error: no such file: {', '.join(map(str, missing))}", err=True)
        sys.exit(2)
    report = verify(paths)
    if as_json:
        click.echo(json.dumps({
            "ok": report.ok, "events": report.events, "first_sequence": report.first_sequence,
            "last_sequence": report.last_sequence, "last_hash": report.last_hash,
            "problems": [p.__dict__ for p in report.problems], "notes": report.notes,
        }, indent=2))
    else:
        for note in report.notes:
            click.echo(f"note: {note}")
        for p in report.problems:
            click.echo(f"TAMPERED {p}")
        if report.ok:
            click.echo(f"ok: {report.events} events, sequence {report.first_sequence}..{report.last_sequence}, "
                       f"last hash {report.last_hash}")
        else:
            click.echo(f"{len(report.problems)} problem(s) in {report.events} events")
    sys.exit(0 if report.ok else 1)


def _matches(ev: dict, agent: str | None, action: str | None, decision: str | None, text: str | None) -> bool:
    p = ev.get("unmapped", {}).get("proctor", {})
    user = (ev.get("actor", {}).get("user") or {}).get("uid")
    if agent and user != agent:
        return False
    if action and not (ev.get("api", {}).get("operation") or "").startswith(action):
        return False
    if decision and p.get("decision") != decision and p.get("event") != decision:
        return False
    if text and text not in json.dumps(ev):
        return False
    return True


def _pretty(ev: dict) -> str:
    p = ev.get("unmapped", {}).get("proctor", {})
    when = time.strftime("%H:%M:%S", time.gmtime(ev.get("time", 0) / 1000))
    user = (ev.get("actor", {}).get("user") or {}).get("uid", "-")
    op = ev.get("api", {}).get("operation", "-")
    res = ", ".join(r.get("name") or r.get("uid", "") for r in ev.get("resources", []))
    code = (ev.get("api", {}).get("response") or {}).get("code", "")
    if p.get("record") == "decision":
        verdict = p.get("decision", "?").upper()
        why = ", ".join(p.get("reasons") or [])
    else:
        verdict = str(p.get("event", "?")).upper()
        why = p.get("reason") or ""
    seq = ev.get("metadata", {}).get("sequence", "")
    return f"{when} #{seq:<6} {verdict:<9} {code!s:<4} {user:<20} {op:<32} {res}" + (f"  [{why}]" if why else "")


@audit.command("tail")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.option("-n", "--lines", default=20, show_default=True, help="Show the last N matching events first.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events as they are written.")
@click.option("--agent", default=None, help="Only this agent (or approver).")
@click.option("--action", default=None, help="Only actions starting with this (e.g. erp.purchase_order).")
@click.option("--decision", default=None, help="Only allow, deny, hold (or an event such as approved).")
@click.option("--grep", "text", default=None, help="Only events containing this text.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw OCSF events.")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
def tail_cmd(file: str | None, lines: int, follow: bool, agent: str | None, action: str | None, decision: str | None,
             text: str | None, as_json: bool, config_path: str | None) -> None:
    """Pretty-print the audit trail (the configured file unless FILE is given)."""
    path = Path(file) if file else load_config_or_exit(config_path).audit_path
    if path is None or not path.exists():
        click.echo(f"error: no audit file at {path}", err=True)
        sys.exit(2)

    def show(raw: bytes) -> None:
        try:
            ev = json.loads(raw)
        except ValueError:
            return
        if _matches(ev, agent, action, decision, text):
            click.echo(json.dumps(ev) if as_json else _pretty(ev))

    with open(path, "rb") as f:
        backlog = [raw for raw in f if raw.strip()]
        shown = [raw for raw in backlog if _matches_raw(raw, agent, action, decision, text)]
        for raw in shown[-lines:] if lines else []:
            show(raw)
        if not follow:
            return
        try:
            while True:
                raw = f.readline()
                if not raw:
                    time.sleep(0.25)
                    if path.exists() and path.stat().st_size < f.tell():  # rotated
                        f.close()
                        f = open(path, "rb")
                    continue
                show(raw)
        except KeyboardInterrupt:
            return


def _matches_raw(raw: bytes, agent, action, decision, text) -> bool:
    try:
        return _matches(json.loads(raw), agent, action, decision, text)
    except ValueError:
        return False
