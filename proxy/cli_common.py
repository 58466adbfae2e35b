"""Helpers shared by the CLI modules."""

from __future__ import annotations

import sys

import click

from .config import ConfigError, ProctorConfig, load_config

CONFIG_HELP = "Config file (default: the embedded default, state in ./.proctor)."


def load_config_or_exit(config_path: str | None) -> ProctorConfig:
    try:
        return load_config(config_path)
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
