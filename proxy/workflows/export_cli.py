"""`proctor workflows export`: the process-mining export of the workflow history (docs/workflows.md,
"Process-mining export"): an OCEL 2.0 JSON log (`--format ocel2`, the default) or a flat CSV
event log (`--format csv`), written to `-o FILE` or standard output.

Two ways to read the history:

- through the control API (the default): `GET /v1/workflows/export` with an approver or
  operator token (`--token` / $PROCTOR_TOKEN, or with the dev issuer `--as USER --group G`),
  as the other `proctor workflows` commands;
- `--direct`: straight from the state store the config names (`-c`; or `--store-url URL`),
  with the config's workflow definitions, no running proxy needed (e.g. a copy of the
  SQLite file, or a PostgreSQL replica). Whoever can read the store can read the history:
  no token is asked for.

A file is written under a temporary name and renamed when the log is complete, so a failed
export never leaves a short file that looks whole.

Exit status: 0 written; 1 the API refused (its problem title and detail are printed) or the
transfer broke off; 2 usage, configuration, connection or store error.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any

import click

from ..approvals.cli import EXIT_REFUSED, _client, _conn, _connection_options, _fail, _opener, _refused
from .export import FORMATS, csv_chunks, ocel_chunks, parse_when

READ_BYTES = 64 * 1024
DOWNLOAD_TIMEOUT = 300.0


def _when(value: str | None, option: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_when(value)
    except ValueError as e:
        _fail(f"{option} {e}")


class _Output:
    """-o FILE (written to a temporary file beside it, renamed when complete) or standard output."""

    def __init__(self, path: str | None) -> None:
        self.path = None if path in (None, "-") else Path(path)  # type: ignore[arg-type]
        self.tmp: Path | None = None
        self.bytes = 0
        if self.path is None:
            self.fh: IO[bytes] = sys.stdout.buffer
            return
        if self.path.is_dir():
            _fail(f"-o {self.path}: is a directory")
        try:
            fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=self.path.parent or ".")
        except OSError as e:
            _fail(f"-o {self.path}: {e.strerror or e}")
        self.tmp = Path(name)
        self.fh = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        self.fh.write(data)
        self.bytes += len(data)

    def commit(self) -> None:
        self.fh.flush()
        if self.tmp is not None and self.path is not None:
            self.fh.close()
            os.replace(self.tmp, self.path)
            self.tmp = None

    def discard(self) -> None:
        if self.tmp is not None:
            self.fh.close()
            self.tmp.unlink(missing_ok=True)
            self.tmp = None


def _from_api(out: _Output, conn: dict[str, Any], query: dict[str, str]) -> None:
    client = _client(conn)
    target = f"{client.url}/v1/workflows/export?{urllib.parse.urlencode(query)}"
    req = urllib.request.Request(target, method="GET", headers={
        "Authorization": f"Bearer {client.token}", "Accept": "application/json, text/csv"})
    try:
        with _opener(client.url).open(req, timeout=DOWNLOAD_TIMEOUT) as resp:
            while data := resp.read(READ_BYTES):
                out.write(data)
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400:
            _fail(f"the control API at {target} answered a redirect ({e.code}); not following it with a token: "
                  "pass the final address with --url")
        _refused(e, target)
    except http.client.IncompleteRead:
        _fail("the export broke off before it was complete (see the proxy's log); nothing was written",
              EXIT_REFUSED)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        _fail(f"cannot read the export from the control API at {target}: {getattr(e, 'reason', e)}")


def _from_store(out: _Output, config_path: str | None, store_url: str | None, fmt: str, workflow: str | None,
                since: float | None, until: float | None) -> None:
    from ..cli_common import load_config_or_exit
    from ..connectors.manifest import ManifestError, load_manifests
    from ..store import StoreError, open_store
    from .spec import load_workflows

    config = load_config_or_exit(config_path)
    try:
        url = store_url or config.store_url
        store = open_store(url)
    except ValueError as e:
        _fail(f"state store: {e}")
    if url.startswith("sqlite://") and url != "sqlite:///:memory:" and not Path(url[len("sqlite://"):]).exists():
        _fail(f"no state store at {url[len('sqlite://'):]} (pass -c with the proxy's config, or --store-url)")
    try:
        specs = load_workflows(config.effective_workflows_dir, load_manifests(config.connectors_dir)).specs
    except ManifestError as e:
        _fail(f"the workflow definitions: {e}")
    if workflow is not None and not any(w.name == workflow for w in specs):
        _fail(f"no loaded workflow definition is named {workflow!r}")
    make: Callable[..., AsyncIterator[str]] = ocel_chunks if fmt == "ocel2" else csv_chunks

    async def run() -> None:
        await store.open()
        try:
            async for chunk in make(store, specs, workflow=workflow, since=since, until=until):
                out.write(chunk.encode("utf-8", "replace"))
        finally:
            await store.close()

    try:
        asyncio.run(run())
    except StoreError as e:
        _fail(str(e) if str(e).startswith("state store") else f"state store: {e}")


@click.command("export")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="ocel2", show_default=True,
              help="ocel2: an OCEL 2.0 JSON log; csv: a flat event log (case_id, activity, timestamp, resource, ...).")
@click.option("--workflow", default=None, help="Only this workflow.")
@click.option("--since", default=None, metavar="WHEN",
              help="Only events at or after WHEN: ISO 8601 (UTC when no offset), epoch seconds, or 30m, 24h, 7d ago.")
@click.option("--until", default=None, metavar="WHEN", help="Only events before WHEN (excluded), as --since.")
@click.option("-o", "--output", default=None, metavar="FILE", help="Write here (default: standard output).")
@click.option("--direct", is_flag=True,
              help="Read the config's state store directly (no running proxy, no token) instead of the control API.")
@click.option("--store-url", default=None, metavar="URL",
              help="With --direct: this state store (sqlite:///ABSOLUTE/PATH.db or postgresql://...) instead of "
                   "the config's.")
@_connection_options
def export(fmt: str, workflow: str | None, since: str | None, until: str | None, output: str | None, direct: bool,
           store_url: str | None, **kw: Any) -> None:
    """Export the workflow history for process mining: an OCEL 2.0 JSON log or a CSV event log."""
    conn = _conn(kw)
    if store_url and not direct:
        _fail("--store-url goes with --direct")
    if direct and (conn["url"] or conn["token"] or conn["as_user"] or conn["groups"]):
        _fail("--direct reads the store itself: --url, --token, --as and --group do not apply")
    if workflow is not None:
        workflow = workflow.strip()
        if not workflow:
            _fail("--workflow is empty")
    lo, hi = _when(since, "--since"), _when(until, "--until")
    if lo is not None and hi is not None and hi <= lo:
        _fail("--until must be after --since")
    out = _Output(output)
    try:
        if direct:
            _from_store(out, conn["config_path"], store_url, fmt, workflow, lo, hi)
        else:
            query = {"format": fmt}
            if workflow is not None:
                query["workflow"] = workflow
            if lo is not None:
                query["since"] = f"{lo:.3f}"
            if hi is not None:
                query["until"] = f"{hi:.3f}"
            _from_api(out, conn, query)
        out.commit()
    except BaseException:
        out.discard()
        raise
    if out.path is not None:
        click.echo(f"wrote {out.path} ({fmt}, {out.bytes} bytes)", err=True)
