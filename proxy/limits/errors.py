"""The one error a counter backend raises when it cannot answer (docs/limits.md, "Failure modes")."""

from __future__ import annotations


class CounterUnavailable(Exception):
    """The counter backend (Redis, or the state store) could not be reached or could not answer.

    Every backend raises this and only this for its own failures (connection refused or
    reset, a timeout, a server error, a state store that is down or lost; the cause is
    chained), so a caller applies one rule per limit: fail closed (refuse) or fail open
    (let the request through, recorded). Invalid arguments are ValueError, never this."""

    def __init__(self, message: str, *, backend: str) -> None:
        super().__init__(message)
        self.backend = backend  # "memory" | "sqlite" | "postgresql" | "redis"
