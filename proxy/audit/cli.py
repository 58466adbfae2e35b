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
@click.option("--key-file", "key_files", multiple=True, type=click.Path(dir_okay=False),
              help="The chain key (repeat for a trail that spans a key change).")
@click.option("--key-env", "key_envs", multiple=True, help="An environment variable holding the chain key (repeatable).")
@click.option("--allow-unkeyed", is_flag=True,
              help="Accept plain SHA-256 events before the first keyed one (a trail older than its key).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def verify_cmd(files: tuple[str, ...], config_path: str | None, key_files: tuple[str, ...], key_envs: tuple[str, ...],
               allow_unkeyed: bool, as_json: bool) -> None:
    """Check the hash chain of an audit trail: report every modified, deleted or
    reordered event and where it is.

    Give the files oldest first (rotated files, then the current one); with no
    FILES, the configured audit file and its rotated predecessors are checked.
    A keyed chain (the default) needs its key: --key-file / --key-env, or the
    config's (used with -c, or when no FILES are given).

    Exit status: 0 intact, 1 tampering found, 2 unusable input (or no key)."""
    from .chain import verify
    from .keys import ChainKey, read_key_env, read_key_file

    config = load_config_or_exit(config_path) if (config_path or not files) else None
    if files:
        paths = [Path(f) for f in files]
    else:
        assert config is not None
        current = config.audit_path
        if current is None:
            click.echo("error: no audit file is configured (audit.file)", err=True)
            sys.exit(2)
        from .filesink import rotated_files

        paths = rotated_files(current) + [current]
    missing = [p for p in paths if not p.exists()]
    if missing:
        click.echo(f"error: no such file: {', '.join(map(str, missing))}", err=True)
        sys.exit(2)
    keys: list[ChainKey] = []
    try:
        keys += [read_key_file(Path(k)) for k in key_files]
        keys += [read_key_env(name) for name in key_envs]
    except ValueError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if not keys and config is not None:
        from .setup import configured_key

        try:
            key = configured_key(config, create=False)
        except ValueError:
            key = None  # reported below if the chain turns out to be keyed
        if key is not None:
            keys.append(key)
    report = verify(paths, keys, allow_unkeyed=allow_unkeyed)
    if as_json:
        click.echo(json.dumps({
            "ok": report.ok, "events": report.events, "first_sequence": report.first_sequence,
            "last_sequence": report.last_sequence, "last_hash": report.last_hash,
            "keyed": report.keyed, "unkeyed": report.unkeyed, "unverified": report.unverified,
            "missing_key_ids": sorted(report.missing_kids),
            "problems": [p.__dict__ for p in report.problems], "notes": report.notes,
        }, indent=2))
    else:
        for note in report.notes:
            click.echo(f"note: {note}")
        for p in report.problems:
            click.echo(f"TAMPERED {p}")
        if report.ok and report.events == 0:
            click.echo("ok: no events (an empty trail)")
        elif report.ok:
            kind = "keyed (HMAC-SHA256)" if report.keyed and not report.unkeyed else (
                "NOT keyed (plain SHA-256)" if not report.keyed else "partly keyed")
            click.echo(f"ok: {report.events} events, sequence {report.first_sequence}..{report.last_sequence}, "
                       f"{kind}, last hash {report.last_hash}")
        elif report.problems:
            click.echo(f"{len(report.problems)} problem(s) in {report.events} events")
    if report.needs_key:
        given = ", ".join(sorted(k.kid for k in keys))
        click.echo(
            f"error: {report.unverified} event(s) are keyed (HMAC-SHA256, key id {', '.join(sorted(report.missing_kids))})"
            + (f" and the key given (id {given}) is not theirs" if keys else " and no key was given")
            + ": pass --key-file PATH or --key-env NAME (or -c CONFIG)", err=True)
    sys.exit(1 if report.problems else (2 if report.needs_key else 0))


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
