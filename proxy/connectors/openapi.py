"""`proctor connector import-openapi`: a connector manifest drafted from an OpenAPI 3 or Swagger 2 document.

The draft is for a team to refine, not to trust blindly: every operation becomes
a route (operationId -> action), path parameters become typed `params` and the
resource id, query parameters become typed `query` values, and the JSON request
body's schema becomes typed `body` fields (scalars up to a few levels deep,
arrays of scalars as `[*]` sets). `$ref`s into the document are resolved. The
result is validated with the same model Proctor loads manifests with.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from .manifest import HTTP_METHODS, ConnectorManifest

MAX_BODY_DEPTH = 3
_TYPE_MAP = {"string": "string", "integer": "long", "number": "decimal", "boolean": "bool"}


class OpenApiError(Exception):
    pass


def _ref(doc: dict, node: Any, seen: frozenset[str] = frozenset()) -> Any:
    """Resolve a local `$ref` (e.g. #/components/schemas/Order)."""
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#/") or ref in seen:
            return {}
        seen = seen | {ref}
        target: Any = doc
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                return {}
            target = target[part]
        node = target
    return node


def _snake(text: str) -> str:
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", text)
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def _camel(text: str) -> str:
    parts = re.split(r"[^A-Za-z0-9]+", text)
    name = "".join(p[:1].upper() + p[1:] for p in parts if p)
    if not name or not name[0].isalpha():
        name = "Resource" + name
    return name


def _value_spec(schema: dict, required: bool = False) -> dict | None:
    t = _TYPE_MAP.get(schema.get("type", "string") if isinstance(schema, dict) else "string")
    if t is None:
        return None
    spec: dict[str, Any] = {"type": t}
    if t == "string" and isinstance(schema.get("pattern"), str):
        spec["pattern"] = schema["pattern"]
    if t == "long":
        if isinstance(schema.get("minimum"), int):
            spec["min"] = schema["minimum"]
        if isinstance(schema.get("maximum"), int):
            spec["max"] = schema["maximum"]
    if required:
        spec["required"] = True
    return spec


def _body_fields(doc: dict, schema: Any, prefix: str = "", depth: int = 0, required: bool = True) -> dict[str, dict]:
    schema = _ref(doc, schema)
    out: dict[str, dict] = {}
    if not isinstance(schema, dict) or depth > MAX_BODY_DEPTH:
        return out
    props = schema.get("properties") or {}
    needed = set(schema.get("required") or []) if required else set()
    for name, sub in props.items():
        sub = _ref(doc, sub)
        path = f"{prefix}{name}"
        field_name = _snake(path.replace("[*]", "_all").replace(".", "_")) or "value"
        if not isinstance(sub, dict):
            continue
        kind = sub.get("type")
        if kind == "object" or "properties" in sub:
            out.update(_body_fields(doc, sub, f"{path}.", depth + 1, required=name in needed))
        elif kind == "array":
            items = _ref(doc, sub.get("items") or {})
            if isinstance(items, dict) and items.get("type") in _TYPE_MAP:
                spec = _value_spec(items)
                if spec:
                    out[field_name] = {"path": f"{path}[*]", **spec}
        else:
            spec = _value_spec(sub, required=name in needed)
            if spec:
                out[field_name] = {"path": path, **spec}
    return out


def _json_body_schema(doc: dict, op: dict, swagger2: bool) -> Any:
    if swagger2:
        for p in op.get("parameters") or []:
            p = _ref(doc, p)
            if isinstance(p, dict) and p.get("in") == "body":
                return p.get("schema")
        return None
    body = _ref(doc, op.get("requestBody") or {})
    content = body.get("content") or {} if isinstance(body, dict) else {}
    for media, desc in content.items():
        if media.split(";")[0].strip() == "application/json" or media.endswith("+json"):
            return (desc or {}).get("schema")
    return None


def _hosts(doc: dict, swagger2: bool) -> list[str]:
    hosts: list[str] = []
    if swagger2:
        if isinstance(doc.get("host"), str):
            hosts.append(doc["host"].lower())
    else:
        for server in doc.get("servers") or []:
            url = server.get("url") if isinstance(server, dict) else None
            if isinstance(url, str) and "://" in url:
                host = urlsplit(re.sub(r"\{[^}]*\}", "x", url)).netloc.lower()
                if host and host not in hosts:
                    hosts.append(host)
    return hosts or ["api.example.com"]


def _base_path(doc: dict, swagger2: bool) -> str:
    if swagger2:
        return (doc.get("basePath") or "").rstrip("/")
    for server in doc.get("servers") or []:
        url = server.get("url") if isinstance(server, dict) else None
        if isinstance(url, str):
            return urlsplit(url).path.rstrip("/") if "://" in url else url.rstrip("/")
    return ""


def manifest_from_openapi(doc: dict, name: str | None = None) -> dict:
    """A connector manifest (as a dict, validated) drafted from an OpenAPI/Swagger document."""
    if not isinstance(doc, dict):
        raise OpenApiError("not an OpenAPI document (expected a mapping)")
    swagger2 = str(doc.get("swagger", "")).startswith("2")
    if not swagger2 and not str(doc.get("openapi", "")).startswith("3"):
        raise OpenApiError("not an OpenAPI 3 or Swagger 2 document (no 'openapi: 3.x' or 'swagger: 2.0')")
    title = (doc.get("info") or {}).get("title") or "api"
    connector = name or _snake(title) or "api"
    base = _base_path(doc, swagger2)
    routes: list[dict] = []
    for raw_path, item in (doc.get("paths") or {}).items():
        item = _ref(doc, item)
        if not isinstance(item, dict):
            continue
        shared_params = [_ref(doc, p) for p in item.get("parameters") or []]
        for method, op in item.items():
            if method.upper() not in HTTP_METHODS or not isinstance(op, dict):
                continue
            params = shared_params + [_ref(doc, p) for p in op.get("parameters") or []]
            path_params = {p["name"]: p for p in params if isinstance(p, dict) and p.get("in") == "path" and "name" in p}
            query_params = {p["name"]: p for p in params if isinstance(p, dict) and p.get("in") == "query" and "name" in p}
            # OpenAPI path params may be any string; Proctor's need to be identifiers
            renamed = {n: (re.sub(r"[^A-Za-z0-9_]", "_", n) if re.match(r"^[A-Za-z_]", n) else f"p_{n}") for n in path_params}
            path = base + re.sub(r"\{([^}]+)\}", lambda m, r=renamed: "{" + r.get(m.group(1), m.group(1)) + "}", raw_path)
            op_id = op.get("operationId") or f"{method}_{raw_path}"
            literal_segments = [s for s in raw_path.strip("/").split("/") if s and "{" not in s]
            rtype = _camel(literal_segments[-1] if literal_segments else connector)
            last_param = next((renamed[n] for n in reversed(re.findall(r"\{([^}]+)\}", raw_path)) if n in renamed), None)
            route: dict[str, Any] = {
                "method": method.upper(),
                "path": path,
                "action": f"{connector}.{_snake(op_id)}",
                "resource": {"type": rtype, "id": "{" + last_param + "}" if last_param else "*"},
            }
            typed_params = {}
            for n, p in path_params.items():
                spec = _value_spec(_ref(doc, p.get("schema") or p))
                if spec and spec["type"] != "string":
                    typed_params[renamed[n]] = spec
            if typed_params:
                route["params"] = typed_params
            query = {}
            for n, p in query_params.items():
                if re.fullmatch(r"[A-Za-z0-9_$.@-]+", n):
                    spec = _value_spec(_ref(doc, p.get("schema") or p), required=bool(p.get("required")))
                    if spec:
                        query[n] = spec
            if query:
                route["query"] = query
            if method.upper() in ("POST", "PUT", "PATCH"):
                # PATCH bodies are partial: the schema's required fields are not required there
                fields = _body_fields(doc, _json_body_schema(doc, op, swagger2), required=method.upper() != "PATCH")
                if fields:
                    route["body"] = fields
            if method.upper() == "DELETE":
                route["risk"] = "high"
            elif method.upper() in ("POST", "PUT", "PATCH"):
                route["risk"] = "medium"
            routes.append(route)
    if not routes:
        raise OpenApiError("the document defines no operations under 'paths'")
    manifest = {
        "name": connector,
        "description": f"Drafted from the OpenAPI document '{title}'. Review actions, resource types and risks.",
        "hosts": _hosts(doc, swagger2),
        "risk": "low",
        "routes": routes,
    }
    ConnectorManifest.model_validate(manifest)  # the draft must load as it is
    return manifest
