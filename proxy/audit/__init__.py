"""Tamper-evident OCSF audit trail: events, hash chain, sinks (see docs/siem.md)."""
