"""Stages that need no feature: gateway routing and the target check.

- `GatewayRoute` answers 404 for a gateway request no route matched (after
  authentication, so routes cannot be probed anonymously). The engine adapter
  routes; this stage only refuses what it could not route.
- `TargetCheck` rewrites the target host to its canonical spelling and refuses
  a request whose request line, Host header, SNI or headers disagree about where
  it is going (core/target.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from .chain import Stage
from .exchange import Exchange
from .model import Refusal
from .target import TLS_PORTS, canonicalise_target, check_target


class GatewayRoute(Stage):
    name = "gateway-route"

    def on_request(self, ex: Exchange) -> None:
        req = ex.request
        assert req is not None
        if req.mode == "reverse" and req.unrouted:
            ex.refuse(Refusal(404, "No gateway route", f"no gateway route matches {req.host}{req.path}",
                              reasons=["no-route"], kind="route"))


class TargetCheck(Stage):
    name = "target"

    def __init__(self, policy_headers: Iterable[str], tls_ports: Iterable[int] = TLS_PORTS) -> None:
        self.policy_headers = frozenset(policy_headers)
        self.tls_ports = frozenset(tls_ports) | TLS_PORTS

    def on_request(self, ex: Exchange) -> None:
        req = ex.request
        assert req is not None
        refusal = canonicalise_target(req) or check_target(req, self.policy_headers, self.tls_ports)
        if refusal is not None:
            ex.refuse(refusal)
