"""Resource attributes that the request itself does not carry.

Two sources, both declared per route in the connector manifest:

- **creator** (`track_creator`): Proctor remembers which agent created a resource
  (from the allowed create's response) in the store; a later request on that
  resource gets `resource.created_by` (an `Agent`).
- **lookup**: a GET of the existing resource on the upstream, with the
  connector's own credential, whose declared values become resource attributes
  (e.g. an incident's current `assignment_group`).

Both fail closed: a store or upstream failure refuses the request (503) rather
than deciding without the attribute a policy may depend on. A resource the
store or the upstream does not know simply lacks the attribute; policies test
it with `has`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Any, Awaitable, Callable
from urllib.parse import quote

from .manifest import ConnectorManifest, LookupSpec
from .values import ValueRejected, body_values
from ..core.model import AgentRequest, Classification, Refusal

log = logging.getLogger("proctor.enrich")

# (connector, url, timeout) -> (status, parsed JSON or None)
FetchJson = Callable[[str, str, float], Awaitable[tuple[int, Any]]]

_CACHE_MAX = 10_000


class LookupFailed(Exception):
    pass


def _param_text(value: Any) -> str:
    if isinstance(value, dict) and "__extn" in value:
        return str(value["__extn"]["arg"])
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def lookup_url(req: AgentRequest, cls: Classification, spec: LookupSpec) -> str:
    path = spec.path
    for name, value in cls.params.items():
        path = path.replace("{" + name + "}", quote(_param_text(value), safe="'()@$-_.~!*,"))
    default = (req.scheme == "https" and req.port == 443) or (req.scheme == "http" and req.port == 80)
    host = f"[{req.host}]" if ":" in req.host else req.host
    authority = host if default else f"{host}:{req.port}"
    return f"{req.scheme}://{authority}{path}"


def tracked_types(manifests: list[ConnectorManifest]) -> frozenset[str]:
    return frozenset(
        r.resource.type for m in manifests for r in m.routes if r.track_creator is not None and r.resource is not None
    )


class Enricher:
    def __init__(self, manifests: list[ConnectorManifest], creator_of=None, fetch_json: FetchJson | None = None) -> None:
        """`creator_of(type, id) -> agent id | None` (async; the store's); `fetch_json` does lookups."""
        self.tracked = tracked_types(manifests)
        self.creator_of = creator_of
        self.fetch_json = fetch_json
        self._cache: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self.lookups = 0
        self.lookup_failures = 0

    def needed(self, cls: Classification) -> bool:
        spec = cls.spec
        return (spec is not None and spec.lookup is not None) or (
            cls.resource_type in self.tracked and cls.resource_id not in ("new", "*", "")
        )

    async def enrich(self, req: AgentRequest, cls: Classification) -> tuple[Classification, Refusal | None]:
        attrs = dict(cls.resource_attrs)
        refs = dict(cls.resource_refs)
        if cls.resource_type in self.tracked and cls.resource_id not in ("new", "*", ""):
            if self.creator_of is None:
                return cls, _unavailable("the store that records resource creators is not configured")
            try:
                creator = await self.creator_of(cls.resource_type, cls.resource_id)
            except Exception as e:
                log.error("creator lookup for %s failed: %s", cls.resource_uid, e)
                return cls, _unavailable("the store that records resource creators is unavailable")
            if creator is not None:
                refs["created_by"] = ("Agent", creator)
        spec = cls.spec.lookup if cls.spec is not None else None
        if spec is not None:
            try:
                attrs.update(await self._lookup(req, cls, spec))
            except LookupFailed as e:
                self.lookup_failures += 1
                return cls, Refusal(
                    503,
                    "Resource lookup failed",
                    f"Proctor could not read {cls.resource_uid} from the upstream to decide this request ({e}); "
                    "it was not forwarded (fail closed)",
                    reasons=["resource-lookup-failed"],
                    kind="fail-closed",
                )
        return replace(cls, resource_attrs=attrs, resource_refs=refs), None

    async def _lookup(self, req: AgentRequest, cls: Classification, spec: LookupSpec) -> dict[str, Any]:
        if self.fetch_json is None:
            raise LookupFailed("no lookup client is configured")
        url = lookup_url(req, cls, spec)
        now = time.monotonic()
        if spec.cache_seconds:
            hit = self._cache.get(url)
            if hit is not None and hit[0] > now:
                self._cache.move_to_end(url)
                return hit[1]
        self.lookups += 1
        try:
            status, doc = await self.fetch_json(cls.connector, url, spec.timeout_seconds)
        except LookupFailed:
            raise
        except Exception as e:  # network, TLS, timeout, credential
            raise LookupFailed(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None
        if status == 404:
            values: dict[str, Any] = {}
        elif 200 <= status < 300:
            try:
                values = body_values(spec.attributes, doc, agent_supplied=False)
            except ValueRejected as e:
                raise LookupFailed(f"the upstream's answer does not fit the manifest: {e}") from None
        else:
            raise LookupFailed(f"the upstream answered {status}")
        if spec.cache_seconds:
            self._cache[url] = (now + spec.cache_seconds, values)
            if len(self._cache) > _CACHE_MAX:
                self._cache.popitem(last=False)
        return values


def _unavailable(detail: str) -> Refusal:
    return Refusal(503, "Proctor could not decide", f"{detail}; the request was not forwarded (fail closed)",
                   reasons=["store-unavailable"], kind="fail-closed")


def created_id(doc: Any, id_from: str) -> str | None:
    """The new resource's id at `id_from` in a create's JSON response (strings and integers)."""
    import re

    node = doc
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", id_from):
        if name:
            if not isinstance(node, dict) or name not in node:
                return None
            node = node[name]
        else:
            if not isinstance(node, list) or int(index) >= len(node):
                return None
            node = node[int(index)]
    if isinstance(node, bool) or not isinstance(node, (str, int)):
        return None
    text = str(node)
    return text if text and len(text) <= 512 else None
