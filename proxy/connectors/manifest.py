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
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
RISK_TIERS = ("low", "medium", "high", "critical")
_PARAM_RE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
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


class RouteSpec(_Strict):
    method: str
    path: str
    action: str
    resource: ResourceSpec
    attributes: dict[str, Any] = Field(default_factory=dict)
    risk: Literal["low", "medium", "high", "critical"] | None = None

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
        for seg in v.strip("/").split("/"):
            if "{" in seg and not _PARAM_RE.match(seg) and seg != "{*}":
                raise ValueError(f"path segment {seg!r}: a parameter must be a whole segment like {{name}}")
        return v

    @field_validator("action")
    @classmethod
    def _action(cls, v: str) -> str:
        if not _ACTION_RE.match(v):
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
        params = set(re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", self.path))
        if self.resource.id is not None and "{*}" in self.resource.id and not self.path.rstrip("/").endswith("{*}"):
            raise ValueError(f"resource id uses {{*}}, but the path {self.path!r} has no {{*}} tail")
        for used in re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", self.resource.id or ""):
            if used not in params:
                raise ValueError(f"resource id uses {{{used}}}, which the path {self.path!r} does not define")
        return self


class ConnectorManifest(_Strict):
    name: str
    description: str = ""
    hosts: list[str]
    risk: Literal["low", "medium", "high", "critical"] = "low"
    routes: list[RouteSpec]

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("a connector needs at least one host pattern")
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
