"""Connector manifests: YAML files mapping an enterprise system's HTTP API to Cedar terms.

```yaml
name: ticketing
hosts: ["ticketing.example.com", "*.service-now.com", "127.0.0.1:9101"]
risk: low                      # default tier for routes that do not set one
routes:
  - method: POST
    path: /api/now/table/incident/{sys_id}
    action: ticketing.incident.update
    resource: {type: Incident, id: "{sys_id}"}
    attributes: {table: incident}
    risk: medium
```
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..coordination.concurrency_spec import ConcurrencySpec, check_route_concurrency, concurrency_error
from ..coordination.dedupe import DedupeSpec, check_route_dedupe
from ..coordination.handoff_spec import HandoffSpec, check_route_handoff
from ..limits.budget_spec import CostSpec
from ..limits.spec import RateLimitSpec, check_route_rate_limits, route_rate_limits_error
from .credentials import UpstreamAuth

HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
RISK_TIERS = ("low", "medium", "high", "critical")
_ACTION_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")
_TYPE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(::[A-Za-z_][A-Za-z0-9_]*)*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResourceSpec(_Strict):
    type: str
    # Template such as "{sys_id}" or a literal; default: the normalised request path.
    id: str | None = None

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        if not _TYPE_RE.match(v):
            raise ValueError(f"resource type {v!r} is not a valid Cedar entity type name")
        return v


ValueType = Literal["string", "long", "decimal", "bool"]


class ValueSpec(_Strict):
    """A typed value from the path, the query string or the JSON body.

    `long`/`decimal` also accept numbers sent as strings (OData sends many
    numbers that way); anything that does not convert exactly is refused (400).
    """

    type: ValueType = "string"
    pattern: str | None = None  # strings: must match entirely
    # long/decimal: inclusive bounds. For an aggregate they bound every element,
    # and default to 0 there (a negative line must not offset a total).
    min: Decimal | None = None
    max: Decimal | None = None
    required: bool = False  # query and body values: refuse the request when missing

    @model_validator(mode="after")
    def _bounds(self) -> "ValueSpec":
        if (self.min is not None or self.max is not None) and self.type not in ("long", "decimal"):
            raise ValueError("min and max apply to long and decimal values")
        for bound in (self.min, self.max):
            if bound is not None and (not bound.is_finite() or bound != bound.quantize(Decimal("0.0001"))):
                raise ValueError("min and max must be finite numbers with at most 4 decimal places")
        if self.type == "long":
            for bound in (self.min, self.max):
                if bound is not None and bound != bound.to_integral_value():
                    raise ValueError("min and max of a long must be integers")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is greater than max")
        return self

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"pattern {v!r} is not a valid regular expression: {e}") from None
        return v


class BodyFieldSpec(ValueSpec):
    # Dotted path into the JSON body; `[*]` takes every element of an array and
    # makes the value a set, `[N]` takes one element: "order.items[*].sku".
    path: str
    # Fold a `[*]` path into one number instead of a set: `sum`, `min`, `max` of
    # the values, or `count` of the elements. Policies cannot add up a set, so a
    # threshold on an order's total needs the connector to compute it.
    aggregate: Literal["sum", "min", "max", "count"] | None = None
    # With `sum`: multiply each value by this field of the same element first
    # (quantity x unit price). A path relative to the element the last `[*]` selects.
    weight: str | None = None
    # Inclusive lower bound of each weight (default 0: a negative quantity would
    # turn a line into a credit that offsets the total).
    weight_min: Decimal | None = None

    @model_validator(mode="after")
    def _aggregate(self) -> "BodyFieldSpec":
        if self.aggregate is None:
            if self.weight is not None:
                raise ValueError("weight needs aggregate: sum")
            if self.weight_min is not None:
                raise ValueError("weight_min needs aggregate: sum and a weight")
            return self
        if self.weight_min is not None and self.weight is None:
            raise ValueError("weight_min needs a weight")
        if "[*]" not in self.path:
            raise ValueError(f"aggregate needs a [*] path (it folds a set), not {self.path!r}")
        if self.aggregate == "count":
            if self.type != "long":
                raise ValueError("aggregate: count gives a long; declare type: long")
        elif self.type not in ("long", "decimal"):
            raise ValueError(f"aggregate: {self.aggregate} needs type long or decimal")
        if self.weight is not None:
            if self.aggregate != "sum":
                raise ValueError("weight is only meaningful with aggregate: sum")
            if not re.fullmatch(r"[A-Za-z0-9_$@-]+(\.[A-Za-z0-9_$@-]+)*", self.weight):
                raise ValueError(f"weight {self.weight!r}: a dotted field path inside each element")
        return self

    @field_validator("path")
    @classmethod
    def _body_path(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_$@-]+(\[(\*|\d+)\])*(\.[A-Za-z0-9_$@-]+(\[(\*|\d+)\])*)*", v):
            raise ValueError(f"body path {v!r}: use dotted names with optional [*] or [N], e.g. order.items[*].sku")
        return v


class RpcOperation(_Strict):
    """One JSON-RPC operation on a route (the operation is in the body, not the path).

    `method` is the JSON-RPC method (e.g. MCP's `tools/call`); `tool` narrows
    `tools/call` to one tool (`params.name`). Body paths are relative to the
    JSON-RPC message, e.g. `params.arguments.amount`.
    """

    method: str
    tool: str | None = None
    action: str
    resource: ResourceSpec
    attributes: dict[str, Any] = Field(default_factory=dict)
    risk: Literal["low", "medium", "high", "critical"] | None = None
    body: dict[str, BodyFieldSpec] = Field(default_factory=dict)
    resource_attributes: list[str] = Field(default_factory=list)

    @field_validator("action")
    @classmethod
    def _action(cls, v: str) -> str:
        if not _ACTION_RE.match(v):
            raise ValueError(f"action {v!r} may contain only letters, digits and . _ : -")
        return v

    @model_validator(mode="after")
    def _check(self) -> "RpcOperation":
        for name in self.resource_attributes:
            if name not in self.body:
                raise ValueError(f"resource_attributes names {name!r}, which is not a body value of this operation")
        return self


class TrackCreator(_Strict):
    """Remember which agent created a resource: after an allowed create answered 2xx,
    Proctor reads the new resource's id from the JSON response and stores
    (resource type, id) -> agent. Later requests on that resource see it as the
    resource attribute `created_by` (an `Agent`), so a policy can say "no agent
    approves an order it created"."""

    id_from: str  # dotted path into the JSON response, e.g. d.PurchaseOrder or result.sys_id

    @field_validator("id_from")
    @classmethod
    def _id_from(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_$@-]+(\[\d+\])*(\.[A-Za-z0-9_$@-]+(\[\d+\])*)*", v):
            raise ValueError(f"id_from {v!r}: a dotted path such as d.PurchaseOrder")
        return v


class LookupSpec(_Strict):
    """Read attributes of the existing resource from the upstream before deciding
    (a policy information point): Proctor GETs `path` on the same upstream with the
    connector's own credential and copies the declared values into the resource's
    attributes. A failed lookup (network error, 5xx, a value of the wrong type)
    refuses the request (503); a 404 leaves the attributes absent."""

    path: str  # template over the route's path parameters: /api/now/table/incident/{sys_id}
    attributes: dict[str, BodyFieldSpec]
    cache_seconds: float = Field(0.0, ge=0, le=3600)
    timeout_seconds: float = Field(5.0, gt=0, le=60)

    @field_validator("path")
    @classmethod
    def _lookup_path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("lookup path must start with '/'")
        return v

    @field_validator("attributes")
    @classmethod
    def _lookup_attrs(cls, v: dict[str, BodyFieldSpec]) -> dict[str, BodyFieldSpec]:
        if not v:
            raise ValueError("lookup needs at least one attribute")
        for name in v:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"lookup attribute name {name!r} must be a plain identifier")
            if name == "created_by":
                raise ValueError("created_by is reserved for track_creator")
        return v


class ApprovalWait(_Strict):
    """How an agent waits when a request on this route (or connector) is held for approval.
    Unset values fall back to the `approvals` section of the config."""

    mode: Literal["sync", "async"] | None = None
    wait_seconds: float | None = Field(None, gt=0, le=3600)


class ClaimSpec(_Strict):
    """A write on this route claims its resource (docs/coordination.md): `exclusive` keeps
    every other agent's writes out (409) until the claim expires or is released; `shared`
    claims coexist but keep an exclusive one out. The holder's writes renew it.
    `acquire: implicit` claims on the first allowed write; `api` only checks (claims are
    taken by another route or the control API, never by this route's writes)."""

    mode: Literal["exclusive", "shared"] = "exclusive"
    ttl_seconds: int = Field(ge=1, le=7 * 24 * 3600)
    acquire: Literal["implicit", "api"] = "implicit"


def _claim_error(data: Any) -> Any:
    """Validate a route's `claim` up front so the error names the route (method and path)."""
    if isinstance(data, dict) and data.get("claim") is not None:
        try:
            ClaimSpec.model_validate(data["claim"])
        except Exception as e:  # pydantic ValidationError: keep its text, add where
            raise ValueError(f"route {data.get('method', '?')} {data.get('path', '?')}: invalid claim: {e}") from None
        if data.get("jsonrpc") is not None:
            raise ValueError(f"route {data.get('method', '?')} {data.get('path', '?')}: "
                             "claim is not supported on jsonrpc routes")
    return data


_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_QUERY_NAME_RE = re.compile(r"^[A-Za-z0-9_$.@-]+$")


class RouteSpec(_Strict):
    method: str
    path: str
    # For a JSON-RPC endpoint (`jsonrpc:` below) the action and resource come from
    # the matched operation instead.
    action: str = ""
    resource: ResourceSpec | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)
    risk: Literal["low", "medium", "high", "critical"] | None = None
    # Typed values, delivered to Cedar as context.params / context.query_params / context.fields.
    params: dict[str, ValueSpec] = Field(default_factory=dict)  # path parameters
    query: dict[str, ValueSpec] = Field(default_factory=dict)
    body: dict[str, BodyFieldSpec] = Field(default_factory=dict)
    # Names of params/query/body values also copied into the resource's attributes.
    resource_attributes: list[str] = Field(default_factory=list)
    # JSON-RPC endpoint (e.g. MCP Streamable HTTP): operations matched on the body.
    jsonrpc: list[RpcOperation] | None = None
    track_creator: TrackCreator | None = None
    lookup: LookupSpec | None = None
    approval: ApprovalWait | None = None
    # Equivalent writes by any agent inside a window are not forwarded twice (docs/coordination.md).
    dedupe: DedupeSpec | None = None
    # Uploads: a body Proctor cannot read (not JSON, a form or multipart) is forwarded
    # as opaque instead of refused (415); policies see context.payload.format == "opaque",
    # its size and media type. A route that reads body fields cannot be opaque.
    opaque_body: bool = False
    # Writes claim the resource (coordination between agents; docs/coordination.md).
    claim: ClaimSpec | None = None
    # A forwarded 2xx write moves the claim to the agent or human group the request names.
    handoff: HandoffSpec | None = None
    # Writes are forwarded with If-Match: the agent's last-seen ETag (docs/coordination.md).
    concurrency: ConcurrencySpec | None = None
    # Requests on this route count against these rate limits (docs/limits.md): one or a list.
    rate_limit: RateLimitSpec | list[RateLimitSpec] | None = None
    # What one call costs against the budgets it counts in (docs/limits.md, "Budgets").
    cost: CostSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _claim(cls, data: Any) -> Any:
        return _claim_error(data)

    @model_validator(mode="before")
    @classmethod
    def _concurrency_value(cls, data: Any) -> Any:
        return concurrency_error(data)

    @model_validator(mode="before")
    @classmethod
    def _rate_limit_value(cls, data: Any) -> Any:
        return route_rate_limits_error(data)

    @property
    def rate_limits(self) -> list[RateLimitSpec]:
        """The route's rate limits (`rate_limit:`, one or a list)."""
        rl = self.rate_limit
        return [] if rl is None else list(rl) if isinstance(rl, list) else [rl]

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        v = v.upper()
        if v != "*" and v not in HTTP_METHODS:
            raise ValueError(f"unknown HTTP method {v!r}")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("route path must start with '/'")
        segments = v.strip("/").split("/")
        for i, seg in enumerate(segments):
            if seg == "{*}":
                if i != len(segments) - 1:
                    raise ValueError("{*} may only be the last path segment")
                continue
            if "{" in seg or "}" in seg:
                # a whole-segment {name}, or literal text around placeholders: A_PurchaseOrder('{po}')
                rest = re.sub(r"\{[A-Za-z_][A-Za-z0-9_]*\}", "", seg)
                if "{" in rest or "}" in rest:
                    raise ValueError(f"path segment {seg!r}: placeholders look like {{name}}")
                if re.search(r"\}\{", seg):
                    raise ValueError(f"path segment {seg!r}: two placeholders need literal text between them")
        return v

    @field_validator("action")
    @classmethod
    def _action(cls, v: str) -> str:
        if v and not _ACTION_RE.match(v):
            raise ValueError(f"action {v!r} may contain only letters, digits and . _ : -")
        return v

    @field_validator("attributes")
    @classmethod
    def _attributes(cls, v: dict[str, Any]) -> dict[str, Any]:
        from ..core.context import BodyRejected, to_cedar

        try:
            to_cedar(v)
        except BodyRejected as e:
            raise ValueError(f"attributes: {e}") from None
        return v

    @model_validator(mode="after")
    def _resource_params(self) -> "RouteSpec":
        if self.jsonrpc is not None:
            if self.action or self.resource is not None or self.body:
                raise ValueError("a jsonrpc route takes action, resource and body from its operations, not the route")
            if not self.jsonrpc:
                raise ValueError("jsonrpc needs at least one operation")
        elif not self.action or self.resource is None:
            raise ValueError("a route needs an action and a resource (or jsonrpc operations)")
        params = set(re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", self.path))
        for name in self.params:
            if name not in params:
                raise ValueError(f"params declares {name!r}, which the path {self.path!r} does not define")
        for name in list(self.params) + list(self.body):
            if not _NAME_RE.match(name):
                raise ValueError(f"value name {name!r} must be a plain identifier")
        for name in self.query:  # query names keep their own spelling ($top, sap-client)
            if not _QUERY_NAME_RE.match(name):
                raise ValueError(f"query parameter name {name!r} may contain letters, digits and _ $ . @ -")
        known = params | set(self.query) | set(self.body)
        for name in self.resource_attributes:
            if name not in known:
                raise ValueError(f"resource_attributes names {name!r}, which is not a path, query or body value")
        if self.opaque_body and (self.body or self.jsonrpc is not None):
            raise ValueError("opaque_body: a route that reads body fields (or JSON-RPC) needs bodies Proctor can read")
        if self.jsonrpc is not None and (self.track_creator or self.lookup):
            raise ValueError("track_creator and lookup are not supported on jsonrpc routes")
        if self.lookup is not None:
            for used in re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", self.lookup.path):
                if used not in params:
                    raise ValueError(f"lookup path uses {{{used}}}, which the path {self.path!r} does not define")
            clash = set(self.lookup.attributes) & (set(self.resource_attributes) | set(self.attributes))
            if clash:
                raise ValueError(f"lookup attributes {sorted(clash)} are also set by the route")
        rid = self.resource.id if self.resource is not None else None
        if rid is not None and "{*}" in rid and not self.path.rstrip("/").endswith("{*}"):
            raise ValueError(f"resource id uses {{*}}, but the path {self.path!r} has no {{*}} tail")
        for used in re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", rid or ""):
            if used not in params:
                raise ValueError(f"resource id uses {{{used}}}, which the path {self.path!r} does not define")
        return self

    @model_validator(mode="after")
    def _dedupe(self) -> "RouteSpec":
        if self.dedupe is not None:
            check_route_dedupe(self.dedupe, self.method, self.path, set(self.params), set(self.body),
                               self.jsonrpc is not None)
        if self.handoff is not None:
            check_route_handoff(self.handoff, self.method, self.path, set(self.params), set(self.body),
                                self.claim is not None, self.jsonrpc is not None)
        if self.concurrency is not None:
            check_route_concurrency(self.concurrency, self.method, self.path,
                                    self.resource.id if self.resource is not None else None, self.jsonrpc is not None)
        if self.rate_limit is not None:
            fields = set(self.body) | {n for op in self.jsonrpc or [] for n in op.body}
            check_route_rate_limits(self.rate_limits, self.method, self.path,
                                    set(re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", self.path)), set(self.query), fields)
        if self.cost is not None:
            declared = (set(self.body) | set(self.query) | {n for op in self.jsonrpc or [] for n in op.body}
                        | set(re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", self.path)))
            missing = sorted(self.cost.fields - declared)
            if missing:
                raise ValueError(f"route {self.method} {self.path}: cost reads {missing}, which the route does not "
                                 "declare as typed values (params, query or body)")
        return self


class ConnectorManifest(_Strict):
    name: str
    description: str = ""
    hosts: list[str]
    risk: Literal["low", "medium", "high", "critical"] = "low"
    routes: list[RouteSpec]
    # The upstream credential Proctor injects (secrets referenced, never inline).
    auth: UpstreamAuth | None = None
    approval: ApprovalWait | None = None  # default for the connector's routes
    # The shape of Proctor's refusals on this connector's hosts: `problem` (problem+json) or
    # the API's own error shape, so its SDKs show the reason (`openai`: OpenAI's error object).
    # JSON-RPC routes always answer JSON-RPC errors.
    error_format: Literal["problem", "openai"] = "problem"

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("a connector needs at least one host pattern")
        from ..core.hosts import HostRejected, canonical_host

        for pattern in v:
            host, sep, port = pattern.rpartition(":") if not pattern.endswith("]") else ("", "", "")
            if not sep or (host.count(":") and not host.endswith("]")):
                host, port = pattern, ""
            if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(f"host pattern {pattern!r}: invalid port")
            host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            if "*" not in host:
                try:
                    canonical_host(host)
                except HostRejected as e:
                    raise ValueError(f"host pattern {pattern!r}: {e}") from None
        return [h.lower() for h in v]


class ManifestError(Exception):
    pass


def load_manifest(path: Path) -> ConnectorManifest:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ManifestError(f"{path}: cannot read manifest: {e}") from None
    try:
        return ConnectorManifest.model_validate(raw)
    except Exception as e:
        raise ManifestError(f"{path}: invalid connector manifest:\n{e}") from None


def load_manifests(directory: Path) -> list[ConnectorManifest]:
    """Every `*.yaml`/`*.yml` manifest in `directory` (one level, plus `*/connector.yaml`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ManifestError(f"connectors directory {directory} does not exist")
    files = sorted([*directory.glob("*.yaml"), *directory.glob("*.yml"), *directory.glob("*/connector.yaml")])
    manifests = [load_manifest(f) for f in files]
    names = [m.name for m in manifests]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ManifestError(f"duplicate connector names: {sorted(dupes)}")
    return manifests
