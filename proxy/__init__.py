"""Proctor: an autonomy control plane for AI agents (import name `proxy`)."""

__version__ = "0.1.0"
