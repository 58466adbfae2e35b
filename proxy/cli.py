"""The `proctor` command line."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

import click

from . import __version__
from .config import ConfigError, ProctorConfig, load_config

CONFIG_HELP = "Config file (default: the embedded default, state in ./.proctor)."


def _load(config_path: str | None) -> ProctorConfig:
    try:
        return load_config(config_path)
    except ConfigError as e:
        hint = ""
        if config_path is not None and not Path(config_path).exists():
            hint = (" (pass the file `proctor run -c` uses, e.g. .proctor/demo.yaml for `proctor demo`, or leave out "
                    "-c for the embedded default: state in ./.proctor)")
        raise click.ClickException(f"{e}{hint}") from None


def _parse_claims(claims: tuple[str, ...]) -> dict:
    """--claim K=V options; V is parsed as JSON when it can be (so groups='["a"]' is a list)."""
    out = {}
    for c in claims:
        k, sep, v = c.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{c!r}: expected K=V", param_hint="--claim")
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


# Libraries whose DEBUG output is request data and nothing else: aiosqlite logs every
# SQL statement with its parameters (a held request's preview), hpack/h2 every header.
QUIET_LOGGERS = ("aiosqlite", "hpack", "h2")


def _setup_logging(level: str) -> None:
    import threading

    from .logredact import install

    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Every line goes through the redacting filter (docs/security.md#no-secret-in-free-text).
    for handler in logging.getLogger().handlers:
        install(handler)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)  # library warnings go through the filter too
    # mitmproxy logs every client connect/disconnect at INFO; keep them for -v debug.
    if level.upper() != "DEBUG":
        logging.getLogger("mitmproxy").setLevel(logging.WARNING)

    # Uncaught exceptions would be printed straight to stderr, past the filter: log them.
    def log_uncaught(exc_type, exc, tb) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        logging.getLogger("proctor").critical("uncaught exception", exc_info=(exc_type, exc, tb))

    def log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        logging.getLogger("proctor").error(
            "uncaught exception in thread %s", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback)
        )

    sys.excepthook = log_uncaught
    threading.excepthook = log_uncaught_in_thread


@click.group()
@click.version_option(__version__, prog_name="proctor")
def main() -> None:
    """Proctor: the autonomy control plane for AI agents."""


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]))
def run(config_path: str | None, log_level: str) -> None:
    """Run the proxy (agents on 127.0.0.1:8080, control API on 127.0.0.1:8081)."""
    _setup_logging(log_level)
    from .connectors.manifest import ManifestError
    from .policy.engine import PolicyLoadError
    from .server import serve

    config = _load(config_path)
    try:
        asyncio.run(serve(config))
    except PolicyLoadError as e:
        hint = ""
        if config.policies.schema_from_connectors and any(
                "unrecognized action" in p or "unrecognized entity type" in p for p in e.problems):
            # the schema comes from the connectors: a connectors_dir without the ones the policies are for
            hint = (f"\nthe policies in {config.policies.dir} name actions or entity types that no connector in "
                    f"connectors_dir ({config.connectors_dir}) declares (the schema is generated from the connector "
                    "manifests): keep the connectors those policies are written for in connectors_dir (the bundled "
                    "policies are for the bundled connectors: crm, erp, llm, ticketing), or point policies.dir at "
                    "policies for your connectors (docs/configuration.md)")
        raise click.ClickException("policies cannot be loaded, refusing to start:\n  " + "\n  ".join(e.problems)
                                   + hint) from None
    except ManifestError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot start: {e}") from None
    except ValueError as e:  # e.g. store.url_env names an unset variable
        raise click.ClickException(f"cannot start: {e}") from None


@main.group()
def token() -> None:
    """Agent tokens from the embedded dev issuer."""


@token.command("issue")
@click.option("--agent", default=None, help="Agent id (becomes the token subject and Agent::\"<id>\").")
@click.option("--approver", default=None, help="Instead of an agent token: a token for a human approver with this id.")
@click.option("--group", "groups", multiple=True, help="With --approver: an approval group (repeatable).")
@click.option("--claim", "claims", multiple=True, metavar="K=V", help="Extra claim; V is parsed as JSON when it can be.")
@click.option("--ttl", default=None, help="Lifetime such as 15m, 1h, 2d (default: the dev issuer's default_ttl).")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
def token_issue(
    agent: str | None, approver: str | None, groups: tuple[str, ...], claims: tuple[str, ...], ttl: str | None,
    config_path: str | None,
) -> None:
    """Print a JWT from the dev issuer: for an agent (--agent), or for a human
    approver (--approver, --group) to use with the approvals API, CLI and console."""
    from .identity.dev_issuer import DevIssuer

    if (agent is None) == (approver is None):
        raise click.UsageError("give exactly one of --agent or --approver")
    if groups and approver is None:
        raise click.UsageError("--group goes with --approver")
    config = _load(config_path)
    if not config.dev_issuer_enabled:
        raise click.ClickException("the dev issuer is disabled in this config (dev_issuer.enabled: false)")
    extra = _parse_claims(claims)
    reserved = {"iss", "aud", "sub", "exp", "nbf", "iat", "jti"} & extra.keys()
    if reserved:
        raise click.BadParameter(f"reserved claims cannot be set: {sorted(reserved)}", param_hint="--claim")
    audience = None
    if approver is not None:
        extra[config.approvals.approver_groups_claim] = list(groups)
        audience = config.approvals.approver_audience
    try:
        issuer = DevIssuer(config.dev_issuer_dir, config.dev_issuer)
        click.echo(issuer.issue(agent or approver, extra, ttl, audience=audience))
    except ValueError as e:
        raise click.ClickException(str(e)) from None


@main.group()
def ca() -> None:
    """The interception CA agents must trust."""


@ca.command("export")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
def ca_export(path: str | None, config_path: str | None) -> None:
    """Write the CA certificate (PEM) to PATH, or print it: the configured CA (`ca:`),
    checked like `proctor run` checks it, else the generated one."""
    from .ca import export_ca_pem

    config = _load(config_path)
    try:
        pem = export_ca_pem(config)
    except ValueError as e:  # a configured CA that cannot be used (never shows key material)
        raise click.ClickException(str(e)) from None
    if path:
        Path(path).write_bytes(pem)
        click.echo(f"wrote {path}", err=True)
    else:
        click.echo(pem.decode(), nl=False)


@main.group()
def policy() -> None:
    """Policy authoring tools."""


def _policy_source(config_path: str | None, policy_dir: str | None, schema_file: str | None):
    from .connectors.manifest import ManifestError
    from .policy.sources import policy_source

    config = _load(config_path)
    pdir = Path(policy_dir) if policy_dir else None
    try:
        return policy_source(config, pdir, Path(schema_file) if schema_file else None)
    except ManifestError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


def _load_bundle_or_exit(source, exit_code: int):
    from .policy.engine import PolicyLoadError, load_bundle

    try:
        return load_bundle(source)
    except PolicyLoadError as e:
        for p in e.problems:
            click.echo(f"error: {p}", err=True)
        sys.exit(exit_code)


_POLICY_OPTIONS = [
    click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP),
    click.option("--dir", "policy_dir", type=click.Path(file_okay=False), help="Policy directory (default: from config)."),
    click.option("--schema", "schema_file", type=click.Path(dir_okay=False), help="Schema (default: <dir>/schema.cedarschema)."),
]


def policy_options(f):
    for option in reversed(_POLICY_OPTIONS):
        f = option(f)
    return f


@policy.command("validate")
@policy_options
def policy_validate(config_path: str | None, policy_dir: str | None, schema_file: str | None) -> None:
    """Strictly validate the policies against the schema; every policy needs a unique @id,
    and every file must be formatted canonically (see `proctor policy fmt`).

    Exit status: 0 valid, 1 invalid."""
    from .policy.formatting import unformatted

    source = _policy_source(config_path, policy_dir, schema_file)
    bundle = _load_bundle_or_exit(source, 1)
    badly_formatted = unformatted(source.policy_dir)
    for f, _ in badly_formatted:
        click.echo(f"error: {f} is not formatted canonically; run `proctor policy fmt`", err=True)
    if badly_formatted:
        sys.exit(1)
    click.echo(f"ok: {bundle.policy_count} policies, revision {bundle.revision}")


@policy.command("fmt")
@click.option("--check", is_flag=True, help="Only report files that are not formatted (exit 1); change nothing.")
@policy_options
def policy_fmt(check: bool, config_path: str | None, policy_dir: str | None, schema_file: str | None) -> None:
    """Format the *.cedar files in place (Cedar's formatter; comments are kept).

    Exit status: 0 formatted (or nothing to do), 1 with --check when a file would change,
    2 when a file cannot be parsed."""
    from .policy.formatting import format_text

    source = _policy_source(config_path, policy_dir, schema_file)
    changed, broken = [], []
    for f in sorted(source.policy_dir.glob("*.cedar")):
        text = f.read_text()
        try:
            formatted = format_text(text)
        except ValueError as e:
            broken.append(f)
            click.echo(f"error: {f}: cannot be parsed: {e}", err=True)
            continue
        if formatted != text:
            changed.append(f)
            if check:
                click.echo(f"would reformat {f}")
            else:
                f.write_text(formatted)
                click.echo(f"reformatted {f}")
    if broken:
        sys.exit(2)
    if check and changed:
        sys.exit(1)
    if not changed:
        click.echo("all policy files are formatted")


@policy.command("test")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False, exists=True))
@click.option("-v", "--verbose", is_flag=True, help="List passing cases too.")
@click.option(
    "--no-validate-request",
    is_flag=True,
    help="Do not validate test requests against the schema (e.g. contexts copied from live traffic, "
    "which may carry attributes the schema does not declare).",
)
@policy_options
def policy_test(
    files: tuple[str, ...],
    verbose: bool,
    no_validate_request: bool,
    config_path: str | None,
    policy_dir: str | None,
    schema_file: str | None,
) -> None:
    """Run policy tests in the Cedar CLI's run-tests JSON format (default: <dir>/tests/*.test.json).

    Each case names a request, its entities, the expected decision, the expected
    reasons (policy @ids) and optionally num_errors / has_error.
    Exit status: 0 all passed, 1 a case failed, 2 the policies or a test file are unusable."""
    from .policy.testing import TestFileError, run_files

    source = _policy_source(config_path, policy_dir, schema_file)
    bundle = _load_bundle_or_exit(source, 2)
    paths = [Path(f) for f in files] or sorted((source.policy_dir / "tests").glob("*.test.json"))
    if not paths:  # unusable input (2), not a failed case (1)
        click.echo(f"error: no test files given and none in {source.policy_dir / 'tests'}", err=True)
        sys.exit(2)
    try:
        results = run_files(bundle, paths, validate_request=not no_validate_request)
    except TestFileError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    failed = [r for r in results if not r.passed]
    for r in results:
        if r.passed and not verbose:
            continue
        click.echo(f"{'PASS' if r.passed else 'FAIL'}  {r.file} :: {r.name}")
        for p in r.problems:
            click.echo(f"      {p}")
        if r.note:
            click.echo(f"      note: {r.note}")
    click.echo(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if failed:
        sys.exit(1)


@policy.command("explain", context_settings={"ignore_unknown_options": True})
@click.option("--agent", default=None, help="Agent id to explain the request for (no token needed).")
@click.option("--decision", "decision_id", default=None, metavar="DECISION_ID",
              help="Explain a recorded decision (from the decision record) under the current policies.")
@click.option("--claim", "claims", multiple=True, metavar="K=V", help="A claim of the agent's token; V is parsed as JSON when it can be.")
@click.option("--request", "request_file", type=click.Path(dir_okay=False, exists=True),
              help='A JSON request: {"method", "url", "headers", "body"}.')
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--url", default=None, metavar="URL",
              help="With --decision: ask this replica's control API, which finds the decision on whichever "
                   "replica made it (operator token: --token / $PROCTOR_TOKEN, or dev --as U --group G).")
@click.option("--token", default=None, metavar="JWT", help="With --url: an operator token (default: $PROCTOR_TOKEN).")
@click.option("--as", "as_user", default=None, metavar="USER", help="With --url, dev only: mint a token for USER.")
@click.option("--group", "groups", multiple=True, metavar="G", help="With --as: a group (repeatable).")
@click.argument("curl", nargs=-1, type=click.UNPROCESSED)
def policy_explain(
    agent: str | None, decision_id: str | None, claims: tuple[str, ...], request_file: str | None, as_json: bool,
    config_path: str | None, url: str | None, token: str | None, as_user: str | None, groups: tuple[str, ...],
    curl: tuple[str, ...],
) -> None:
    """Explain a request: what Proctor derives from it and which policies decide it.

    Give the request as a curl-like line after `--`, or with --request FILE:

    \b
      proctor policy explain --agent support-bot --claim 'groups=["support"]' -- \\
          curl -X DELETE https://acme.service-now.com/api/now/table/incident/INC1

    Or explain a recorded decision by its X-Proctor-Decision-Id, from this host's decision
    record, or (--url) through a running replica's control API, whichever replica made it:

    \b
      proctor policy explain --decision 01a1fd0fa646-97d0262bc7aa4a17a25e
      proctor policy explain --decision 01a1fd0fa646-97d0262bc7aa4a17a25e --url http://proctor-control:8081

    Exit status: 0 explained (whatever the decision), 1 the control API refused (--url: no such
    decision on any replica, not an operator), 2 unusable input."""
    remote = url is not None or token is not None or as_user is not None
    if groups and not remote:
        raise click.UsageError("--group goes with --as")
    if decision_id is not None:
        if agent or claims or request_file or curl:
            raise click.UsageError("--decision explains a recorded request: give no --agent, --claim or request")
        if remote:
            _explain_remote(decision_id, as_json, {"url": url, "config_path": config_path, "token": token,
                                                   "as_user": as_user, "groups": groups})
        else:
            _explain_recorded(config_path, decision_id, as_json)
        return
    if remote:
        raise click.UsageError("--url, --token and --as go with --decision")
    if agent is None:
        raise click.UsageError("give --agent (and the request), or --decision DECISION_ID")
    from .connectors.classifier import build_classifier
    from .connectors.manifest import ManifestError, load_manifests
    from .core.model import AgentIdentity
    from .policy.engine import PolicyLoadError, PolicyStore
    from .policy.explain import ExplainInputError, build_request, explain, parse_curl, parse_request_json, render_text
    from .policy.sources import policy_source

    config = _load(config_path)
    try:
        if request_file:
            method, url, headers, body = parse_request_json(json.loads(Path(request_file).read_text()))
        elif curl:
            method, url, headers, body = parse_curl(list(curl))
        else:
            raise ExplainInputError("give the request as a curl line after `--`, or with --request FILE")
        req = build_request(method, url, headers, body)
        manifests = load_manifests(config.connectors_dir)
        store = PolicyStore(policy_source(config, manifests=manifests))
        classifier = build_classifier(manifests, config.egress)
    except (ExplainInputError, ValueError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (PolicyLoadError, ManifestError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    token_claims = {"sub": agent, **_parse_claims(claims)}
    identity = AgentIdentity(agent_id=agent, issuer="(explain)", claims=token_claims, expires_at=None)
    result = explain(config, store, classifier, req, identity)
    click.echo(json.dumps(result.as_dict(), indent=2, default=str) if as_json else render_text(result))


def _explain_remote(decision_id: str, as_json: bool, conn: dict) -> None:
    """A recorded decision explained by the replica that made it, found through the control API."""
    import urllib.parse

    from .approvals.cli import _client
    from .policy.explain import render_recorded

    decision_id = decision_id.strip()
    if not decision_id:
        raise click.UsageError("--decision needs a decision id")
    doc = _client(conn).call("GET", f"/v1/decisions/{urllib.parse.quote(decision_id, safe='')}/explain")
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
    else:
        click.echo(render_recorded(doc))
        click.echo(f"replica    {doc.get('replica')}")


def _explain_recorded(config_path: str | None, decision_id: str, as_json: bool) -> None:
    from .policy.engine import PolicyLoadError, PolicyStore
    from .policy.explain import recorded_explanation, render_recorded
    from .policy.replay import ReplayInputError, find_record
    from .policy.sources import policy_source

    config = _load(config_path)
    try:
        rec = find_record(config.decisions_path, decision_id.strip())
        if rec is None:
            raise ReplayInputError(f"no decision {decision_id} in {config.decisions_path}")
        if rec.cedar is None or not rec.action:
            refusal = rec.refusal
            raise ReplayInputError(
                f"decision {decision_id} was refused before any policy ran ({refusal['kind'] if refusal else '?'}: "
                f"{refusal['detail'] if refusal else ''}), or recorded without policy inputs"
            )
        store = PolicyStore(policy_source(config))
    except (ReplayInputError, PolicyLoadError, ValueError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    result = recorded_explanation(store, rec)
    click.echo(json.dumps(result, indent=2, default=str) if as_json else render_recorded(result))


@policy.command("replay")
@click.option("--candidate", "candidate_dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="Candidate policy directory (with its schema.cedarschema).")
@click.option("--since", default=None, help="Only decisions since this time (ISO 8601, or 30m, 24h, 7d ago).")
@click.option("--until", default=None, help="Only decisions before this time.")
@click.option("--decisions", "decisions_file", default=None, type=click.Path(dir_okay=False),
              help="Decision record to replay (default: the config's).")
@click.option("--limit", default=50, show_default=True, help="Changes listed in the text report.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.option("--fail-on-change", is_flag=True,
              help="Exit 1 when any decision would change or cannot be replayed (for CI).")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
def policy_replay(
    candidate_dir: str, since: str | None, until: str | None, decisions_file: str | None, limit: int, as_json: bool,
    fail_on_change: bool, config_path: str | None,
) -> None:
    """Re-evaluate recorded decisions against a candidate policy set; report what would change.

    Exit status: 0 replayed (1 with --fail-on-change when something changes), 2 unusable input."""
    from .policy.engine import PolicyLoadError, PolicyStore
    from .policy.replay import ReplayInputError, Unreadable, parse_time, read_records, render_report, replay
    from .policy.sources import policy_source

    config = _load(config_path)
    try:
        lo = parse_time(since) if since else None
        hi = parse_time(until) if until else None
        candidate = PolicyStore(policy_source(config, Path(candidate_dir)))
        path = Path(decisions_file) if decisions_file else config.decisions_path
        unreadable = Unreadable()  # lines that are not records: counted, and named in the report
        report = replay(read_records(path, lo, hi, unreadable), candidate, unreadable)
    except (ReplayInputError, PolicyLoadError, ValueError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else render_report(report, limit))
    if fail_on_change and (report.changes or report.unevaluable):  # (one that cannot be replayed is no proof)
        sys.exit(1)


@policy.command("suggest")
@click.option("--since", default=None, help="Only traffic since this time (ISO 8601, or 30m, 24h, 7d ago).")
@click.option("--until", default=None, help="Only traffic before this time.")
@click.option("--agent", "agents", multiple=True, metavar="ID", help="Only this agent's traffic (repeatable).")
@click.option("--connector", "connectors", multiple=True, metavar="NAME", help="Only this connector's traffic (repeatable).")
@click.option("--records", "records", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="Decision record file(s) to learn from, .gz too (repeatable; default: the config's and its rotated files).")
@click.option("--group-by", type=click.Choice(["group", "agent"]), default="group", show_default=True,
              help="One permit per agent group (agents in no group: per agent), or per agent.")
@click.option("--no-bounds", is_flag=True, help="No bounds on the values seen: scope (principal, action, resource type) only.")
@click.option("--min-count", default=1, show_default=True, type=click.IntRange(min=1),
              help="Leave out a permit learned from fewer requests than this.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the suggestion to this file instead of stdout.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: the permits, what each covers, the Cedar text, the proof.")
@click.option("--check", is_flag=True, help="Exit 1 when the replay changes any recorded decision, also of traffic not learned from.")
@policy_options
def policy_suggest(
    since: str | None, until: str | None, agents: tuple[str, ...], connectors: tuple[str, ...], records: tuple[str, ...],
    group_by: str, no_bounds: bool, min_count: int, output: str | None, as_json: bool, check: bool,
    config_path: str | None, policy_dir: str | None, schema_file: str | None,
) -> None:
    """Suggest least-privilege Cedar permits from recorded traffic (allowed, or monitored and
    forwarded): one per agent group, action and resource type, bounded to the typed values
    seen. Validated against the schema and proven by a replay of the same traffic; the
    forbid policies and approval holds of the policy set keep applying on top.

    Exit status: 0 suggested, 1 the suggestion does not validate or does not allow a request
    it learned from (with --check also: the replay decides any recorded request otherwise),
    2 unusable input or nothing to learn from."""
    from .connectors.manifest import ManifestError, load_manifests
    from .policy.replay import ReplayInputError, parse_time
    from .policy.suggest import (Filters, Options, SuggestInputError, SuggestionRejected, decision_files,
                                 render_proof, suggest, summary)

    config = _load(config_path)
    source = _policy_source(config_path, policy_dir, schema_file)
    try:
        filters = Filters(parse_time(since) if since else None, parse_time(until) if until else None,
                          frozenset(agents), frozenset(connectors))
        paths = [Path(r) for r in records] if records else decision_files(config.decisions_path)
        if not paths:
            raise SuggestInputError(f"no decision record at {config.decisions_path} (give the proxy's -c proctor.yaml, or --records FILE)")
        manifests = list(source.manifests) or load_manifests(config.connectors_dir)
        options = Options(filters, "agent" if group_by == "agent" else "group", not no_bounds, min_count)
        result = suggest(paths, source, options, manifests)
    except (ReplayInputError, SuggestInputError, ManifestError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except SuggestionRejected as e:
        for p in e.problems:
            click.echo(f"error: {p}", err=True)
        if e.result is not None and e.result.proof is not None:
            click.echo(render_proof(e.result.proof), err=True)
        sys.exit(1)
    if output:
        tmp = Path(output).with_name(f".{Path(output).name}.tmp")
        try:
            tmp.parent.mkdir(parents=True, exist_ok=True)  # -o candidate/suggested.cedar starts the candidate directory
            tmp.write_text(result.text)
            tmp.replace(output)
        except OSError as e:
            click.echo(f"error: cannot write {output}: {e.strerror or e}", err=True)
            sys.exit(2)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2, default=str))
    elif not output:
        click.echo(result.text, nl=False)
    click.echo(summary(result), err=True)
    if output:
        click.echo(f"wrote {output}", err=True)
    assert result.proof is not None
    if check and not result.proof.unchanged:
        sys.exit(1)


@main.group()
def connector() -> None:
    """Connector manifests."""


@connector.command("schema")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
def connector_schema(config_path: str | None) -> None:
    """Print the Cedar schema generated from the connector manifests.

    The policy loader appends it to the schema file; a type or action declared
    in the schema file is left out here (the hand-written declaration wins)."""
    from .connectors.manifest import ManifestError, load_manifests
    from .connectors.schema_gen import declared_in, generate_schema

    config = _load(config_path)
    try:
        from .workflows.spec import load_workflows

        manifests = load_manifests(config.connectors_dir)
        base = config.schema_path.read_text() if config.schema_path.exists() else ""
        from .limits.table import usage_actions

        actions = load_workflows(config.effective_workflows_dir, manifests).actions
        from .limits.budget_table import budget_actions

        usage = usage_actions(config.rate_limits, manifests, actions)
        budget = budget_actions(config.budgets, manifests, actions)
        click.echo(generate_schema(manifests, declared_in(base), workflow_actions=actions, usage_actions=usage,
                                   budget_actions=budget),
                   nl=False)
    except ManifestError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


@connector.command("import-openapi")
@click.argument("spec", type=click.Path(dir_okay=False, exists=True))
@click.option("--name", help="Connector name (default: from the document's title).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the manifest here instead of printing it.")
def connector_import_openapi(spec: str, name: str | None, output: str | None) -> None:
    """Draft a connector manifest from an OpenAPI 3 or Swagger 2 document (YAML or JSON).

    operationId becomes the action, path parameters the resource id, query
    parameters and the JSON request body's schema typed values. Review the draft:
    resource types, risk tiers and the Cedar schema are yours to refine."""
    import yaml

    from .connectors.openapi import OpenApiError, manifest_from_openapi

    try:
        doc = yaml.safe_load(Path(spec).read_text())
        manifest = manifest_from_openapi(doc, name)
    except (yaml.YAMLError, OpenApiError, ValueError) as e:
        raise click.ClickException(f"{spec}: {e}") from None
    text = "# Drafted by `proctor connector import-openapi`; review before use.\n" + yaml.safe_dump(
        manifest, sort_keys=False, width=120
    )
    if output:
        Path(output).write_text(text)
        click.echo(f"wrote {output}: {len(manifest['routes'])} routes", err=True)
    else:
        click.echo(text, nl=False)


@main.command()
@click.option("--keep-running", is_flag=True, help="Leave the proxy and demo systems up afterwards.")
def demo(keep_running: bool) -> None:
    """Start demo systems, the proxy and scripted agents; print every decision."""
    from .demo import run_demo

    sys.exit(run_demo(keep_running=keep_running))


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--url", default=None, help="URL for the live round trip (default: a connector host).")
@click.option("--transparent", is_flag=True,
              help="Expect transparent interception (docs/transparent.md): its absence fails even with proxy variables.")
@click.option("--node", "node", default=None, metavar="PATH", help="The agent's node executable (default: node on PATH).")
@click.option("--no-node", "no_node", is_flag=True, help="Skip the Node.js checks.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(config_path: str | None, url: str | None, transparent: bool, node: str | None, no_node: bool,
           as_json: bool) -> None:
    """Check this environment routes agent traffic through Proctor: proxy variables, NO_PROXY,
    CA trust, a live round trip through the proxy and one straight to the host (transparent
    interception), and Node.js. Exits 1 on any bypass or misconfiguration."""
    from . import doctor as d
    from .connectors.manifest import ManifestError

    config = _load(config_path)
    try:
        hosts = d.connector_hosts_of(config)
    except ManifestError as e:
        raise click.ClickException(str(e)) from None
    proctor_ca, ca_unknown_fix = d.proctor_ca_lookup(config, config_given=config_path is not None)
    findings = d.diagnose(d.environ(), hosts, proctor_ca, url, transparent=transparent, node=node,
                          check_node_js=not no_node, ca_unknown_fix=ca_unknown_fix)
    click.echo(json.dumps(d.as_json(findings), indent=2) if as_json else d.render_text(findings))
    sys.exit(d.exit_code(findings))


@main.command()
@click.option("--backend", type=click.Choice(["iptables", "nftables"]), default="iptables", show_default=True)
@click.option("--proxy-uid", default=None, metavar="UID", help="The uid Proctor runs as: its traffic is not redirected. Required.")
@click.option("--proxy-port", default="15001", show_default=True, metavar="PORT", help="Proctor's transparent listener port.")
@click.option("--exclude-uid", "exclude_uids", multiple=True, metavar="UID", help="Another uid not redirected (a hole; repeatable).")
@click.option("--exclude-port", "exclude_ports", multiple=True, metavar="PORT",
              help="An outbound TCP destination port not redirected (a hole; repeatable).")
@click.option("--exclude-cidr", "exclude_cidrs", multiple=True, metavar="CIDR",
              help="A destination network not redirected (a hole; repeatable).")
@click.option("--dns-port", default="53", show_default=True, metavar="PORT", help="The DNS port allowed out (UDP and TCP).")
@click.option("--dns-server", "dns_servers", multiple=True, metavar="IP|auto|any",
              help="Allow DNS only to these resolvers (repeatable; default auto: the nameservers in the "
                   "namespace's resolv.conf; any: UDP to the DNS port of every host, a hole).")
@click.option("--ipv6/--no-ipv6", default=True, show_default=True, help="Also write the IPv6 rules.")
@click.option("--protect-port", "protect_ports", multiple=True, metavar="PORT|none",
              help="A local TCP port of Proctor's the agent may not connect to (repeatable; default 8080, 8081 "
                   "and 8082: the forward proxy, control API and gateway; none: no such rule).")
@click.option("--status-port", default="8081", show_default=True, metavar="PORT|none",
              help="Proctor's control API port: the agent's connections to it on a local address are redirected to "
                   "the transparent listener, which answers only the approval status URL there (none: no redirect).")
@click.option("--netns", default=None, metavar="NAME", help="A named network namespace (ip netns) instead of the current one.")
@click.option("--apply", "do_apply", is_flag=True, help="Apply the rules (atomic, idempotent) instead of printing them.")
@click.option("--remove", "do_remove", is_flag=True, help="Delete the rules --apply added.")
def netsetup(
    backend: str, proxy_uid: str | None, proxy_port: str, exclude_uids: tuple[str, ...], exclude_ports: tuple[str, ...],
    exclude_cidrs: tuple[str, ...], dns_port: str, dns_servers: tuple[str, ...], ipv6: bool,
    protect_ports: tuple[str, ...], status_port: str, netns: str | None, do_apply: bool, do_remove: bool,
) -> None:
    """Print (or --apply) the iptables/nftables rules that redirect every TCP connection but
    Proctor's own to its transparent listener, and let nothing else out but DNS and ICMP
    (docs/deployment.md#netsetup-reference). Exit 2 on bad input, 1 when the rules cannot be applied."""
    from . import netsetup as ns

    be = "nftables" if backend == "nftables" else "iptables"
    try:
        if do_apply and do_remove:
            raise ns.InputError("--apply and --remove exclude each other")
        if netns is not None:
            ns.check_netns_name(netns)
        if do_remove:
            ns.preflight(be, netns, ipv6)
            click.echo(ns.remove(be, ns.Runner(netns), ipv6=ipv6))
            return
        plan = ns.build_plan(
            proxy_uid=proxy_uid, proxy_port=proxy_port, exclude_uids=exclude_uids, exclude_ports=exclude_ports,
            exclude_cidrs=exclude_cidrs, dns_port=dns_port, dns_servers=dns_servers, ipv6=ipv6,
            resolv_conf=ns.resolv_conf_for(netns), protect_ports=protect_ports or None, status_port=status_port,
        )
        if not do_apply:
            click.echo(ns.render(plan, be, netns), nl=False)
            return
        ns.preflight(be, netns, ipv6)
        for w in plan.warnings:
            click.echo(f"WARNING: {w}", err=True)
        click.echo(ns.apply(plan, be, ns.Runner(netns)))
    except ns.InputError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
    except ns.SetupError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)


def _register_subcommands() -> None:
    from .approvals.cli import approvals
    from .governance.cli import agents, policy_push, policy_revisions, policy_rollback

    from .audit.cli import audit
    from .control.budgets_cli import budgets
    from .coordination.cli import claims
    from .workflows.cli import workflows
    from .workflows.export_cli import export as workflows_export

    main.add_command(approvals)
    main.add_command(agents)
    main.add_command(audit)
    main.add_command(budgets)
    main.add_command(claims)
    main.add_command(workflows)
    workflows.add_command(workflows_export)
    policy.add_command(policy_revisions)
    policy.add_command(policy_rollback)
    policy.add_command(policy_push)


_register_subcommands()


if __name__ == "__main__":
    main()
