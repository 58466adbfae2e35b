"""`proctor approvals list|show|approve|deny`: review and decide held requests.

A thin client of the control API's approvals endpoints (see
proxy/control/openapi.py). It authenticates as a human approver with a Bearer
JWT for the approver audience: `--token` or PROCTOR_TOKEN, or, for local
development, `--as USER --group G` mints one from the embedded dev issuer.

Exit status: 0 done; 1 the API refused (its problem title and detail are
printed); 2 usage, configuration or connection error.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

import click

from ..store.models import APPROVAL_STATES

EXIT_REFUSED = 1
EXIT_USAGE = 2
TIMEOUT_SECONDS = 30.0
TOKEN_TTL = "15m"
CONFIG_HELP = "Config file (default: the embedded default, state in ./.proctor)."


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


# ---------------------------------------------------------------- terminal safety
# Held requests come from agents: never let their text drive the approver's terminal
# (escape sequences could repaint what the approver sees) or reorder it (bidi controls).
_BIDI = {0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def _safe(value: Any, multiline: bool = False) -> str:
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    out = []
    for ch in text:
        o = ord(ch)
        if multiline and ch in "\n\t":
            out.append(ch)
        elif o < 0x20 or 0x7F <= o < 0xA0 or o in _BIDI:
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


# ---------------------------------------------------------------- connection settings
@dataclass
class Client:
    url: str  # control API base, no trailing slash
    token: str

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        """The decoded JSON answer; exits 1 when the API refuses, 2 when it cannot be reached."""
        target = self.url + path
        data = None
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(target, data=data, method=method, headers=headers)
        try:
            with _opener(self.url).open(req, timeout=TIMEOUT_SECONDS) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            if 300 <= e.code < 400:
                _fail(f"the control API at {target} answered a redirect ({e.code}); not following it with "
                      "an approver token: pass the final address with --url")
            _refused(e, target)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            _fail(f"cannot reach the control API at {target}: {reason}")
        try:
            return json.loads(raw)
        except ValueError:
            _fail(f"the control API at {target} did not answer JSON (is this the control port?)")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would resend the Authorization header to wherever a redirect points.
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401, ANN001
        return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _opener(base: str) -> urllib.request.OpenerDirector:
    handlers: list[Any] = [_NoRedirect()]
    host = urllib.parse.urlsplit(base).hostname or ""
    if _is_loopback(host):
        # An agent shell often has HTTP(S)_PROXY pointing at Proctor itself.
        handlers.append(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers)


def _refused(e: urllib.error.HTTPError, target: str) -> NoReturn:
    try:
        raw = e.read()
    except OSError:
        raw = b""
    title, detail = e.reason or "refused", ""
    try:
        doc = json.loads(raw)
        if isinstance(doc, dict):
            title = doc.get("title") or title
            detail = doc.get("detail") or ""
    except ValueError:
        detail = raw.decode("utf-8", "replace").strip()[:500]
    message = f"{e.code} {_safe(title)}"
    if detail:
        message += f": {_safe(detail)}"
    if e.code == 404 and not raw.startswith(b"{"):
        message += f" ({target}: is approvals enabled on this proxy?)"
    _fail(message, EXIT_REFUSED)


def _load_config(config_path: str | None):
    """The config, as `proctor` loads it (errors exit 2)."""
    from ..config import ConfigError, load_config

    try:
        return load_config(config_path)
    except ConfigError as e:
        _fail(str(e))


def _url_from_config(config) -> str:
    if not config.control.enabled:
        _fail("the control API is disabled in this config (control.enabled: false); pass --url")
    host, port = config.control.listen.host, config.control.listen.port
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}"
    if ip.is_unspecified:  # listening on every address: talk to it over loopback
        ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    return f"http://[{ip}]:{port}" if ip.version == 6 else f"http://{ip}:{port}"


def _client(opts: dict) -> Client:
    config = None
    config_path = opts["config_path"]
    as_user, groups = opts["as_user"], opts["groups"]
    if groups and not as_user:
        _fail("--group goes with --as")
    url = opts["url"] or os.environ.get("PROCTOR_CONTROL_URL") or None
    if url is None or as_user:
        config = _load_config(config_path)
    if url is None:
        url = _url_from_config(config)
    url = url.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        _fail(f"--url must be an http(s) address such as http://127.0.0.1:8081, not {url!r}")
    if as_user:
        token = _mint(config, as_user, groups)
    else:
        token = opts["token"] or os.environ.get("PROCTOR_TOKEN") or ""
        token = token.strip()
        if not token:
            _fail("no approver token: pass --token, set PROCTOR_TOKEN, or (dev issuer) --as USER --group G; "
                  "`proctor token issue --approver USER --group G` prints one")
    return Client(url, token)


def _mint(config, user: str, groups: tuple[str, ...]) -> str:
    from ..identity.dev_issuer import DevIssuer

    if not config.dev_issuer_enabled:
        _fail("--as needs the dev issuer, which is disabled in this config (dev_issuer.enabled); "
              "pass an approver token from your identity provider with --token or PROCTOR_TOKEN")
    claim = config.approvals.approver_groups_claim
    try:
        return DevIssuer(config.dev_issuer_dir, config.dev_issuer).issue(
            user, {claim: list(groups)}, TOKEN_TTL, audience=config.approvals.approver_audience
        )
    except (ValueError, OSError) as e:
        _fail(f"cannot mint a dev approver token: {e}")


_CONNECTION_OPTIONS = [
    click.option("--url", default=None, metavar="URL",
                 help="Control API base URL (default: $PROCTOR_CONTROL_URL, else the config's control listen address)."),
    click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP),
    click.option("--token", default=None, metavar="JWT", help="Approver token (default: $PROCTOR_TOKEN)."),
    click.option("--as", "as_user", default=None, metavar="USER",
                 help="Dev only: mint a short-lived approver token for USER from the config's dev issuer."),
    click.option("--group", "groups", multiple=True, metavar="G", help="With --as: an approval group (repeatable)."),
]


def _connection_options(f):
    for option in reversed(_CONNECTION_OPTIONS):
        f = option(f)
    return f


def _conn(kw: dict) -> dict:
    return {k: kw.pop(k) for k in ("url", "config_path", "token", "as_user", "groups")}


def _path(approval_id: str, suffix: str = "") -> str:
    approval_id = approval_id.strip()
    if not approval_id:
        _fail("an approval id is required")
    return "/v1/approvals/" + urllib.parse.quote(approval_id, safe="") + suffix


# ---------------------------------------------------------------- rendering
def cedar_value(value: Any, nested: bool = False) -> str:
    """A Cedar JSON value for people: decimals as numbers, entity refs as Type::"id"."""
    if isinstance(value, dict):
        if set(value) == {"__extn"} and isinstance(value["__extn"], dict):
            ext = value["__extn"]
            arg = ext.get("arg")
            return str(arg) if not isinstance(arg, (dict, list)) else cedar_value(arg, True)
        if set(value) == {"__entity"} and isinstance(value["__entity"], dict):
            ent = value["__entity"]
            return f'{ent.get("type")}::{json.dumps(str(ent.get("id")), ensure_ascii=False)}'
        return "{" + ", ".join(f"{k}: {cedar_value(v, True)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(cedar_value(v, True) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False) if nested else value
    return str(value)


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested records as dotted names = rendered values."""
    if isinstance(value, dict) and value and not ({"__extn"} == set(value) or {"__entity"} == set(value)):
        out: list[tuple[str, str]] = []
        for k, v in value.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, cedar_value(value))]


def _when(ts: str | None) -> datetime | None:
    if not ts:
        return None
    try:
        return datetime.fromisoformat(ts)
    except ValueError:
        return None


def _span(seconds: float) -> str:
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _age(ts: str | None) -> str:
    when = _when(ts)
    return _span(time.time() - when.timestamp()) if when else "?"


def _relative(ts: str | None) -> str:
    when = _when(ts)
    if when is None:
        return _safe(ts or "-")
    delta = when.timestamp() - time.time()
    return f"{ts} ({'in ' + _span(delta) if delta > 0 else _span(delta) + ' ago'})"


def _groups(groups: Any) -> str:
    if isinstance(groups, dict):
        return ", ".join(f"{g} ({n})" if isinstance(n, int) and n > 1 else str(g) for g, n in groups.items())
    if isinstance(groups, list):
        return ", ".join(str(g) for g in groups)
    return str(groups or "")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(rows: list[list[str]], header: list[str], widths: list[int]) -> None:
    cells = [[_clip(_safe(c), w) for c, w in zip(row, widths)] for row in rows]
    cols = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    for row in [header] + cells:
        click.echo("  ".join(c.ljust(cols[i]) for i, c in enumerate(row)).rstrip())


def _print_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, ensure_ascii=False))


def _field(name: str, value: Any) -> None:
    click.echo(f"  {name:<11}{_safe(value)}")


def render_bound_headers(bound: Any) -> None:
    """The headers the approval is bound to: a retry is released only with exactly these
    values, and with the listed absent ones still absent."""
    if not isinstance(bound, dict) or not bound:
        return  # an approval stored before headers were bound (fingerprint v1)
    click.echo("  bound headers (the approval releases only a request with exactly these):")
    present = {k: v for k, v in bound.items() if v is not None}
    for k, v in present.items():
        click.echo(f"    {_safe(k)}: {_safe(v)}")
    absent = [_safe(k) for k, v in bound.items() if v is None]
    if absent:
        click.echo(f"    absent: {', '.join(absent)}")


def render_approval(a: dict) -> None:
    click.echo(f"Approval {_safe(a.get('id'))}  [{_safe(a.get('state'))}]")
    _field("agent", a.get("agent"))
    _field("action", a.get("action"))
    _field("resource", a.get("resource"))
    _field("connector", a.get("connector"))
    _field("groups", _groups(a.get("groups")))
    _field("mode", a.get("mode"))
    _field("created", _relative(a.get("created_at")))
    _field("expires", _relative(a.get("expires_at")))
    if a.get("escalated"):
        _field("escalated", "yes")
    if a.get("decided_at"):
        _field("decided", f"{_relative(a.get('decided_at'))} by {a.get('decided_by')}")
        _field("reason", a.get("reason"))
    elif a.get("reason"):
        _field("reason", a.get("reason"))
    if a.get("forwarded_at"):
        _field("forwarded", _relative(a.get("forwarded_at")))
    _field("decision", a.get("decision_id"))
    if "you_may_decide" in a:
        _field("you decide", "yes" if a["you_may_decide"] else "no (not pending, already voted, or not your group)")

    req = a.get("request") or {}
    click.echo("\nRequest")
    click.echo(f"  {_safe(req.get('method', a.get('method')))} {_safe(req.get('url', a.get('url')))}")
    for k, v in (req.get("headers") or {}).items():
        click.echo(f"  {_safe(k)}: {_safe(v)}")
    render_bound_headers(req.get("bound_headers"))
    body = req.get("body")
    if body is not None:
        note = f"{req.get('body_bytes', len(body))} bytes" + (", truncated" if req.get("body_truncated") else "")
        click.echo(f"  body ({note}):")
        for line in _safe(body, multiline=True).splitlines():
            click.echo("    " + line)
    elif req.get("body_bytes"):
        click.echo(f"  body: {req.get('body_bytes')} bytes (not shown)")

    derived = a.get("derived") or {}
    click.echo("\nDerived")
    for key in ("action", "resource", "connector", "route", "risk"):
        if derived.get(key) not in (None, ""):
            _field(key, cedar_value(derived[key]))
    attrs = derived.get("resource_attributes") or {}
    if attrs:
        click.echo("  resource attributes:")
        for name, value in _flatten(attrs):
            click.echo(f"    {_safe(name)} = {_safe(value)}")
    context = derived.get("context") or {}
    if context:
        click.echo("  context:")
        for name, value in _flatten(context):
            click.echo(f"    {_safe(name)} = {_safe(value)}")
    others = {k: v for k, v in derived.items()
              if k not in ("action", "resource", "connector", "route", "risk", "resource_attributes", "context", "policies")}
    for name, value in _flatten(others) if others else []:
        click.echo(f"  {_safe(name)} = {_safe(value)}")

    click.echo("\nPolicies asking for approval")
    for pid in a.get("policies") or ["(none recorded)"]:
        click.echo(f"  - {_safe(pid)}")

    click.echo("\nVotes")
    votes = a.get("votes") or []
    if not votes:
        click.echo("  (none yet)")
    for v in votes:
        click.echo(f"  {_safe(v.get('at'))}  {_safe(v.get('approver'))} [{_safe(_groups(v.get('groups')))}] "
                   f"{_safe(v.get('decision'))}: {_safe(v.get('reason'))}")


# ---------------------------------------------------------------- commands
@click.group()
def approvals() -> None:
    """Review and decide requests held for human approval (via the control API).

    Authenticate with an approver token (--token or PROCTOR_TOKEN), or in
    development with --as USER --group G (minted by the dev issuer).

    \b
    Exit status: 0 ok, 1 the API refused, 2 usage or connection error."""


@approvals.command("list")
@click.option("--state", "states", multiple=True, default=("pending",), show_default=True,
              type=click.Choice([*APPROVAL_STATES, "all"]), help="Only approvals in this state (repeatable).")
@click.option("--agent", default=None, help="Only this agent's requests.")
@click.option("--action", default=None, help="Only this action.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer.")
@_connection_options
def list_cmd(states: tuple[str, ...], agent: str | None, action: str | None, limit: int, as_json: bool, **kw) -> None:
    """List approvals (pending ones by default)."""
    client = _client(_conn(kw))
    query: dict[str, Any] = {"limit": limit}
    if "all" not in states:
        query["state"] = ",".join(dict.fromkeys(states))
    if agent:
        query["agent"] = agent
    if action:
        query["action"] = action
    doc = client.call("GET", "/v1/approvals?" + urllib.parse.urlencode(query))
    if as_json:
        _print_json(doc)
        return
    items = doc.get("approvals", [])
    if not items:
        what = "" if "all" in states else " ".join(dict.fromkeys(states)) + " "
        click.echo(f"no {what}approvals")
        return
    rows = [
        [a.get("id", ""), a.get("state", ""), a.get("agent", ""), a.get("action", ""), a.get("resource", ""),
         _groups(a.get("groups")), _age(a.get("created_at"))]
        for a in items
    ]
    _table(rows, ["ID", "STATE", "AGENT", "ACTION", "RESOURCE", "GROUPS", "AGE"], [28, 10, 32, 40, 48, 40, 8])
    total = doc.get("total")
    if isinstance(total, int) and total > len(items) and not agent and not action:
        click.echo(f"({len(items)} of {total} shown; raise --limit to see more)")


@approvals.command("show")
@click.argument("approval_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer.")
@_connection_options
def show_cmd(approval_id: str, as_json: bool, **kw) -> None:
    """Show one approval: the held request, what Proctor derived from it, the policies asking and the votes."""
    client = _client(_conn(kw))
    doc = client.call("GET", _path(approval_id))
    if as_json:
        _print_json(doc)
    else:
        render_approval(doc)


def _interactive() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def _reason(reason: str | None) -> str:
    if reason is None:
        if _interactive():
            reason = click.prompt("Reason")
        else:
            _fail("a reason is required: --reason TEXT")
    reason = reason.strip()
    if not reason:
        _fail("a reason is required: --reason TEXT")
    return reason


def _decide(decision: str, approval_id: str, reason: str | None, as_json: bool, kw: dict) -> None:
    conn = _conn(kw)
    path = _path(approval_id, "/" + decision)
    reason = _reason(reason)
    client = _client(conn)
    doc = client.call("POST", path, {"reason": reason})
    if as_json:
        _print_json(doc)
        return
    state = doc.get("state")
    aid = _safe(doc.get("id", approval_id))
    if state == "pending":
        click.echo(f"voted to {decision} {aid}; it is still pending (more approvals are needed)")
    else:
        click.echo(f"{aid} is now {_safe(state)}")


_DECIDE_OPTIONS = [
    click.argument("approval_id", metavar="ID"),
    click.option("--reason", default=None, help="Why (mandatory; recorded with the decision). Prompted for on a terminal."),
    click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer."),
]


def _decide_options(f):
    for option in reversed(_DECIDE_OPTIONS):
        f = option(f)
    return _connection_options(f)


@approvals.command("approve")
@_decide_options
def approve_cmd(approval_id: str, reason: str | None, as_json: bool, **kw) -> None:
    """Approve a held request (the agent's retry then goes through, once)."""
    _decide("approve", approval_id, reason, as_json, kw)


@approvals.command("deny")
@_decide_options
def deny_cmd(approval_id: str, reason: str | None, as_json: bool, **kw) -> None:
    """Deny a held request."""
    _decide("deny", approval_id, reason, as_json, kw)
