"""Shadow mode: evaluate a candidate policy set beside the active one.

Only the active decision is ever enforced. The candidate sees exactly the same
principal, action, resource and context; when its effective decision differs
(allow vs deny, where any evaluation error counts as deny), the difference is
attached to the outcome, written to the decision record and counted in metrics.

A candidate that does not load never stops the proxy: shadow evaluation is off
until it loads, and the problem is reported on /v1/policies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from .engine import AuthzDecision, PolicyLoadError, PolicySource, PolicyStore

log = logging.getLogger("proctor.policy.shadow")


@dataclass
class ShadowResult:
    decision: str
    reasons: list[str]
    errors: list[str]
    revision: str

    def as_dict(self) -> dict[str, Any]:
        return {"decision": self.decision, "reasons": self.reasons, "errors": self.errors, "revision": self.revision}


@dataclass
class ShadowPolicies:
    source: PolicySource
    store: PolicyStore | None = None
    load_error: list[str] = field(default_factory=list)
    evaluations: int = 0
    disagreements: int = 0
    failures: int = 0

    def __post_init__(self) -> None:
        self._try_load()

    def _try_load(self) -> None:
        try:
            self.store = PolicyStore(self.source)
            self.load_error = []
            log.warning("shadow policy set loaded: revision %s", self.store.bundle.revision)
        except PolicyLoadError as e:
            self.load_error = e.problems
            log.error("shadow policy set does not load; shadow evaluation is off:\n  %s", "\n  ".join(e.problems))

    def reload_if_changed(self) -> None:
        if self.store is None:
            fingerprint = self.source.fingerprint()
            if fingerprint != getattr(self, "_failed_fingerprint", None):
                self._failed_fingerprint = fingerprint
                self._try_load()
            return
        self.store.reload_if_changed()

    def compare(
        self, active: AuthzDecision, principal: dict, action: str, resource: dict, context: dict
    ) -> ShadowResult | None:
        """The candidate's verdict when it disagrees with the active one, else None. Never raises."""
        store = self.store
        if store is None:
            return None
        try:
            result = store.authorize(principal, action, resource, context, [principal, resource])
        except Exception:
            self.failures += 1
            log.exception("shadow evaluation failed (the active decision stands)")
            return None
        self.evaluations += 1
        if result.allowed == active.allowed:
            return None
        self.disagreements += 1
        return ShadowResult(
            decision="allow" if result.allowed else "deny",
            reasons=result.reasons,
            errors=result.errors,
            revision=store.bundle.revision,
        )

    def status(self) -> dict[str, Any]:
        return {
            "dir": str(self.source.policy_dir),
            "loaded": self.store is not None,
            "revision": self.store.bundle.revision if self.store else None,
            "load_error": self.load_error if self.store is None else self.store.status.last_error,
            "reload_ok": self.store.status.ok if self.store else False,
            "evaluations": self.evaluations,
            "disagreements": self.disagreements,
            "failures": self.failures,
        }
