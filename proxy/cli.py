"""The `proctor` command line."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
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
        raise click.ClickException(str(e)) from None


def _setup_logging(level: str) -> None:
    from .logredact import install

    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        install(handler)
    # mitmproxy logs every client connect/disconnect at INFO; keep them for -v debug.
    if level.upper() != "DEBUG":
        logging.getLogger("mitmproxy").setLevel(logging.WARNING)


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
        raise click.ClickException("policies cannot be loaded, refusing to start:\n  " + "\n  ".join(e.problems)) from None
    except ManifestError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot start: {e}") from None


@main.group()
def token() -> None:
    """Agent tokens from the embedded dev issuer."""


@token.command("issue")
@click.option("--agent", required=True, help="Agent id (becomes the token subject and Agent::\"<id>\").")
@click.option("--claim", "claims", multiple=True, metavar="K=V", help="Extra claim; V is parsed as JSON when it can be.")
@click.option("--ttl", default=None, help="Lifetime such as 15m, 1h, 2d (default: the dev issuer's default_ttl).")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
def token_issue(agent: str, claims: tuple[str, ...], ttl: str | None, config_path: str | None) -> None:
    """Print a JWT for AGENT from the dev issuer."""
    from .identity.dev_issuer import DevIssuer

    config = _load(config_path)
    if not config.dev_issuer_enabled:
        raise click.ClickException("the dev issuer is disabled in this config (dev_issuer.enabled: false)")
    extra = {}
    for c in claims:
        k, sep, v = c.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{c!r}: expected K=V", param_hint="--claim")
        try:
            extra[k] = json.loads(v)
        except ValueError:
            extra[k] = v
    reserved = {"iss", "aud", "sub", "exp", "nbf", "iat", "jti"} & extra.keys()
    if reserved:
        raise click.BadParameter(f"reserved claims cannot be set: {sorted(reserved)}", param_hint="--claim")
    try:
        click.echo(DevIssuer(config.dev_issuer_dir, config.dev_issuer).issue(agent, extra, ttl))
    except ValueError as e:
        raise click.ClickException(str(e)) from None


@main.group()
def ca() -> None:
    """The interception CA agents must trust."""


@ca.command("export")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
def ca_export(path: str | None, config_path: str | None) -> None:
    """Write the CA certificate (PEM) to PATH, or print it."""
    from .ca import ensure_ca

    config = _load(config_path)
    cert = ensure_ca(config.ca_dir)
    if path:
        shutil.copyfile(cert, path)
        click.echo(f"wrote {path}", err=True)
    else:
        click.echo(cert.read_text(), nl=False)


@main.group()
def policy() -> None:
    """Policy authoring tools."""


@policy.command("validate")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--dir", "policy_dir", type=click.Path(file_okay=False), help="Policy directory (default: from config).")
@click.option("--schema", "schema_file", type=click.Path(dir_okay=False), help="Schema (default: <dir>/schema.cedarschema).")
def policy_validate(config_path: str | None, policy_dir: str | None, schema_file: str | None) -> None:
    """Strictly validate the policies against the schema; every policy needs an @id."""
    from .policy.engine import PolicyLoadError, PolicySource, load_bundle

    config = _load(config_path)
    pdir = Path(policy_dir) if policy_dir else config.policies.dir
    schema = Path(schema_file) if schema_file else (pdir / "schema.cedarschema" if policy_dir else config.schema_path)
    entities = pdir / "entities.json" if policy_dir else config.entities_path
    try:
        bundle = load_bundle(PolicySource(schema, pdir, entities))
    except PolicyLoadError as e:
        for p in e.problems:
            click.echo(f"error: {p}", err=True)
        sys.exit(1)
    click.echo(f"ok: {bundle.policy_count} policies, revision {bundle.revision}")


@main.command()
@click.option("--keep-running", is_flag=True, help="Leave the proxy and demo systems up afterwards.")
def demo(keep_running: bool) -> None:
    """Start demo systems, the proxy and scripted agents; print every decision."""
    from .demo import run_demo

    sys.exit(run_demo(keep_running=keep_running))


if __name__ == "__main__":
    main()
