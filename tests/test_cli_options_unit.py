"""Every `proctor` command's options are reachable: no command declares one option string
twice (click keeps only the last, so the other is silently dead: `proctor budgets list
--group` was both the ledger filter and the groups of an `--as` token, and the filter could
never be used). And the budgets group filter, `--ledger-group`, reaches the control API
next to `--as olga --group proctor-admins`."""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import click
import jwt
import yaml
from click.testing import CliRunner

from proxy.cli import main as proctor_cli


def leaf_commands(cmd: click.Command = proctor_cli, path: str = "proctor") -> list[tuple[str, click.Command]]:
    if isinstance(cmd, click.Group):
        return [leaf for name, sub in cmd.commands.items() for leaf in leaf_commands(sub, f"{path} {name}")]
    return [(path, cmd)]


def test_no_command_declares_an_option_twice() -> None:
    commands = leaf_commands()
    assert len(commands) > 30
    clashes = {}
    for path, cmd in commands:
        seen: dict[str, str] = {}
        for param in cmd.params:
            for opt in [*param.opts, *param.secondary_opts]:
                if not opt.startswith("-"):
                    continue
                if opt in seen:
                    clashes[f"{path} {opt}"] = (seen[opt], param.name)
                seen[opt] = str(param.name)
    assert clashes == {}


class _Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).seen.append((self.path, self.headers.get("Authorization", "")))
        if self.path.startswith("/v1/budgets/"):  # as the real API answers an unknown name
            status, ctype = 404, "application/problem+json"
            body = json.dumps({"title": "No such budget", "status": 404, "detail": "no budget po-monthly"}).encode()
        else:
            status, ctype = 200, "application/json"
            body = json.dumps({"budgets": [], "ledger_available": True}).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_budgets_ledger_group_filter_reaches_the_api_beside_an_as_token(tmp_path: Path) -> None:
    cfg = tmp_path / "proctor.yaml"
    cfg.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state")}))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Recorder.seen = []
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        r = CliRunner().invoke(proctor_cli, [
            "budgets", "list", "-c", str(cfg), "--url", url, "--as", "olga", "--group", "proctor-admins",
            "--ledger-group", "procurement", "--agent", "buy-bot"])
        assert r.exit_code == 0, r.output
        assert "no budgets are declared" in r.stdout and "used more than once" not in r.output
        r = CliRunner().invoke(proctor_cli, [
            "budgets", "show", "po-monthly", "-c", str(cfg), "--url", url, "--as", "olga", "--group", "proctor-admins",
            "--ledger-group", "sales"])
        assert r.exit_code == 1 and "No such budget" in r.output
    finally:
        server.shutdown()
        server.server_close()
    (list_path, auth), (show_path, _) = _Recorder.seen
    parts = urllib.parse.urlsplit(list_path)
    assert parts.path == "/v1/budgets"
    assert urllib.parse.parse_qs(parts.query) == {"group": ["procurement"], "agent": ["buy-bot"]}
    claims = jwt.decode(auth.removeprefix("Bearer "), options={"verify_signature": False})
    assert claims["sub"] == "olga" and claims["approval_groups"] == ["proctor-admins"]
    parts = urllib.parse.urlsplit(show_path)
    assert parts.path == "/v1/budgets/po-monthly" and urllib.parse.parse_qs(parts.query) == {"group": ["sales"]}
