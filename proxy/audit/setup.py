"""Build the audit trail from the config."""

from __future__ import annotations

from ..config import ProctorConfig
from .chain import Chain
from .sink import Sink
from .trail import AuditTrail, FileSink, Redactor


def build_audit(config: ProctorConfig) -> tuple[AuditTrail | None, Redactor]:
    a = config.audit
    redactor = Redactor(a.redact.keys, a.redact.patterns)
    if not a.enabled:
        return None, redactor
    sinks: list[Sink] = []
    chain = Chain()
    path = config.audit_path
    if path is not None and a.file is not None:
        f = a.file
        file_sink = FileSink(path, f.max_bytes, f.max_age_seconds, f.keep, f.fsync, f.overflow)
        sinks.append(file_sink)
        # continue the chain from the current file, or else the newest rotated one
        chain = Chain.resume_from(path)
        if chain.seq == 0 and file_sink.rotated_files():
            chain = Chain.resume_from(file_sink.rotated_files()[-1])
    if a.sinks:
        from .netsinks import build_sink

        for cfg in a.sinks:
            sinks.append(build_sink(cfg))
    trail = AuditTrail(sinks, redactor, chain, frozenset(m.upper() for m in a.fail_closed_methods), a.block_timeout_seconds)
    return trail, redactor
