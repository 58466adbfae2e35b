"""Build the audit trail from the config."""

from __future__ import annotations

from pathlib import Path

from ..config import ProctorConfig
from .chain import Chain
from .keys import ChainKey, generate_key_file, read_key_env, read_key_file
from .sink import Sink
from .trail import AuditTrail, FileSink, Redactor

DEFAULT_KEY_FILE = "audit-chain.key"


def chain_key_path(config: ProctorConfig) -> Path:
    p = config.audit.chain_key_file or Path(DEFAULT_KEY_FILE)
    return p if p.is_absolute() else config.state_dir / p


def configured_key(config: ProctorConfig, create: bool) -> ChainKey | None:
    """The chain key the config names (None: unkeyed chain). With `create`, the default
    key file is generated on first use; an explicitly configured source must exist."""
    a = config.audit
    if a.chain_alg == "sha256":
        return None
    if a.chain_key_env:
        return read_key_env(a.chain_key_env)
    path = chain_key_path(config)
    if a.chain_key_file is None and create:
        return generate_key_file(path)
    return read_key_file(path)


def replica_id(config: ProctorConfig) -> str:
    """This replica's name in records, audit events and fleet views (config.replica_id)."""
    from ..policy.fleet import default_replica_id

    return config.replica_id or default_replica_id(config)


def build_audit(config: ProctorConfig) -> tuple[AuditTrail | None, Redactor]:
    a = config.audit
    redactor = Redactor(a.redact.keys, a.redact.patterns)
    if not a.enabled:
        return None, redactor
    key = configured_key(config, create=True)
    sinks: list[Sink] = []
    path = config.audit_path
    if path is not None and a.file is not None:
        f = a.file
        file_sink = FileSink(path, f.max_bytes, f.max_age_seconds, f.keep, f.fsync, f.overflow,
                             reserve_bytes=f.reserve_bytes, min_free_bytes=f.min_free_bytes)
        sinks.append(file_sink)
        # continue the chain from the current file, or else the newest rotated one
        chain = Chain.resume([path, *reversed(file_sink.rotated_files())], key)
    else:
        chain = Chain(key=key)
        chain.restart = {"reason": "no audit file to continue from (audit.file is off): a new chain starts"}
    if a.sinks:
        from .netsinks import build_sink

        for cfg in a.sinks:
            sinks.append(build_sink(cfg, state_dir=config.state_dir))
    trail = AuditTrail(sinks, redactor, chain, frozenset(m.upper() for m in a.fail_closed_methods), a.block_timeout_seconds,
                       replica=replica_id(config))
    return trail, redactor
