"""Workflows: step order across agents, exceptions, outcome KPIs (docs/workflows.md)."""
