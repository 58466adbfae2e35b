"""Coordination between agents (issue 12): claims on resources, handoffs, and
duplicate-work suppression (Idempotency-Key, dedupe windows). See docs/coordination.md."""
