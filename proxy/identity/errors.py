"""Identity errors. Messages are safe to show the agent: they never contain the token."""


class AuthError(Exception):
    """The presented credential is missing or invalid (407 / 401)."""


class IdentityUnavailable(Exception):
    """We cannot verify anything right now (JWKS unreachable, no cached key): fail closed (503)."""
