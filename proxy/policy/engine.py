"""Cedar policies: load once, validate strictly, evaluate fast, swap atomically on reload.

A `PolicyBundle` is immutable: the cedarpy Schema, PolicySet and Entities
handles are parsed once and reused for every request. `PolicyStore.reload()`
builds a new bundle off to the side and swaps a single reference, so a request
always sees one consistent set; a bundle that fails to parse or validate is
rejected and the last good one stays active (and the failure is reported on
the control API's health endpoints).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cedarpy

from ..connectors.manifest import ManifestError
from ..approvals.policy import approval_requirements
from ..connectors.schema_gen import declared_in, generate_schema

from .index import PolicyIndex, PolicyPart

log = logging.getLogger("proctor.policy")

ENTITY_CACHE_SIZE = 1024
# Each cached handle holds its own copy of the static entities: only cache when they are few.
ENTITY_CACHE_MAX_STATIC = 1000

_POLICY_REF_RE = re.compile(r"policy `([^`]*)`")
_QUOTED_RE = re.compile(r"`[^`]*`")


def error_policy_ids(text: str) -> list[str]:
    return _POLICY_REF_RE.findall(text)


def sanitise_error(text: str) -> str:
    """A Cedar evaluation error with policy ids shown as @id and every quoted value elided.

    Cedar quotes the operands it failed on, which may come from a request body
    or a claim: those must not reach the agent, the decision record or logs.
    """
    parts = _POLICY_REF_RE.split(text)  # [text, id, text, id, ...]
    out = []
    for i, piece in enumerate(parts):
        out.append(f"policy @{piece}" if i % 2 else _QUOTED_RE.sub("`…`", piece))
    return "".join(out)


class PolicyLoadError(Exception):
    """The policy directory cannot be used; `problems` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class PolicySource:
    schema_path: Path
    policy_dir: Path
    entities_path: Path | None = None
    # Connector manifests whose actions and resource types are generated into the
    # schema (connectors/schema_gen.py); empty: the schema file says everything.
    manifests: tuple = ()
    # Actions that are workflow steps: their generated context declares `workflow`.
    workflow_actions: frozenset = frozenset()
    # Rate-limited actions (-> whether every request of it is limited): their context declares `usage`.
    usage_actions: tuple = ()
    # Budgeted actions (-> whether every request of it is budgeted): their context declares `budget`.
    budget_actions: tuple = ()

    def files(self) -> list[Path]:
        files = [self.schema_path, *sorted(self.policy_dir.glob("*.cedar"))]
        if self.entities_path is not None:
            files.append(self.entities_path)
        return files

    def fingerprint(self) -> tuple:
        """Cheap change detection: (path, mtime_ns, size) of every input file."""
        out = []
        for f in self.files():
            try:
                st = f.stat()
                out.append((str(f), st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                out.append((str(f), None, None))
        return tuple(out)


@dataclass(frozen=True)
class PolicyInfo:
    policy_id: str  # the @id annotation
    effect: str  # permit | forbid
    file: str
    annotations: dict[str, str]


@dataclass(frozen=True)
class PolicyBundle:
    revision: str
    schema: Any  # cedarpy.Schema
    policy_set: Any  # cedarpy.PolicySet: every policy, keyed by @id
    entities: Any  # cedarpy.Entities
    static_uids: frozenset[tuple[str, str]]
    policies: dict[str, PolicyInfo]  # @id -> info
    policy_est: dict[str, dict]  # @id -> the policy in Cedar's JSON form
    index: PolicyIndex  # action id -> the policies whose scope can match it
    loaded_at: float
    files: tuple[str, ...]
    approvals: dict = field(default_factory=dict)  # @id -> ApprovalRequirement (@approval policies)
    sources: dict = field(default_factory=dict)  # file name -> text of every input (schema, policies, entities)

    @property
    def policy_count(self) -> int:
        return len(self.policies)

    def part_for(self, action: str) -> PolicyPart:
        return self.index.part_for(action)


@dataclass(frozen=True)
class AuthzDecision:
    allowed: bool
    reasons: list[str]  # @ids of the determining policies
    errors: list[str]  # evaluation errors (any error means deny)
    error_policies: list[str] = field(default_factory=list)  # @ids of policies that errored


def _read(path: Path, what: str, problems: list[str]) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        problems.append(f"{what} {path} does not exist")
    except OSError as e:
        problems.append(f"{what} {path}: {e}")
    return None


def _parse_schema(path: Path, text: str) -> Any:
    if path.suffix == ".json":
        return cedarpy.Schema.from_json_str(text)
    return cedarpy.Schema.from_str(text)


def load_bundle(source: PolicySource) -> PolicyBundle:
    """Parse and strictly validate a policy directory; raise PolicyLoadError with every problem."""
    problems: list[str] = []
    hasher = hashlib.sha256()

    sources: dict[str, str] = {}  # file name -> text, for the revision history (rollback)
    schema_text = _read(source.schema_path, "schema", problems)
    if schema_text is not None:
        sources[source.schema_path.name] = schema_text
    schema = None
    if schema_text is not None:
        hasher.update(schema_text.encode())
        generated = ""
        if source.manifests:
            if source.schema_path.suffix == ".json":
                problems.append(
                    f"schema {source.schema_path.name}: connector schema generation needs a human-format "
                    ".cedarschema file (or policies.schema_from_connectors: false)"
                )
            else:
                try:
                    generated = generate_schema(list(source.manifests), declared_in(schema_text),
                                                workflow_actions=source.workflow_actions,
                                                usage_actions=dict(source.usage_actions),
                                                budget_actions=dict(source.budget_actions))
                except ManifestError as e:
                    problems.append(f"schema from connectors: {e}")
        hasher.update(generated.encode())
        try:
            schema = _parse_schema(source.schema_path, schema_text + ("\n" + generated if generated else ""))
        except ValueError as e:
            where = f"{source.schema_path.name} + the schema generated from connectors" if generated else source.schema_path.name
            problems.append(f"schema {where}: {e}")

    if not source.policy_dir.is_dir():
        raise PolicyLoadError([*problems, f"policy directory {source.policy_dir} does not exist"])
    policy_files = sorted(source.policy_dir.glob("*.cedar"))
    if not policy_files:
        problems.append(f"no *.cedar policy files in {source.policy_dir}")

    # Parse each file on its own first, so syntax errors and missing @ids name their file.
    texts: list[str] = []
    owners: list[tuple[str, PolicyInfo | None]] = []  # per policy, in concatenation order
    seen_ids: dict[str, str] = {}
    for f in policy_files:
        text = _read(f, "policy file", problems)
        if text is None:
            continue
        hasher.update(f.name.encode() + b"\0" + text.encode())
        sources[f.name] = text
        try:
            est = json.loads(cedarpy.policies_to_json_str(text))
        except ValueError as e:
            problems.append(f"{f.name}: syntax error: {e}")
            continue
        if est.get("templates"):
            problems.append(f"{f.name}: policy templates are not supported yet")
        for internal, pol in (est.get("staticPolicies") or {}).items():
            annotations = pol.get("annotations") or {}
            pid = annotations.get("id")
            loc = f"{f.name} ({internal} in file order)"
            if not pid:
                problems.append(f"{loc}: every policy must carry a non-empty @id(\"...\") annotation")
                owners.append((internal, None))
                continue
            if pid in seen_ids:
                problems.append(f"{f.name}: duplicate @id {pid!r} (also in {seen_ids[pid]})")
            seen_ids[pid] = f.name
            owners.append(
                (internal, PolicyInfo(policy_id=pid, effect=pol.get("effect", "?"), file=f.name, annotations=annotations))
            )
        texts.append(text)

    entities_json = "[]"
    if source.entities_path is not None and source.entities_path.exists():
        ent_text = _read(source.entities_path, "entities file", problems)
        if ent_text is not None:
            hasher.update(ent_text.encode())
            entities_json = ent_text
            sources[source.entities_path.name] = ent_text

    if problems:
        raise PolicyLoadError(problems)

    combined = "\n".join(texts)
    result = cedarpy.validate_policies(combined, schema, release_gil=True)
    if not result.validation_passed:
        for err in result.errors:
            pid = result.id_annotations_by_policy_id.get(err.policy_id, err.policy_id)
            problems.append(f"schema validation: policy {pid!r}: {err.error}")
        raise PolicyLoadError(problems)

    # Re-key every policy by its @id (Cedar then reports @ids directly), and
    # partition by action (see index.py: a pure optimisation).
    est = json.loads(cedarpy.policies_to_json_str(combined))
    by_id = {pol["annotations"]["id"]: pol for pol in (est.get("staticPolicies") or {}).values()}
    info_by_pid = {info.policy_id: info for _, info in owners if info is not None}
    approvals, approval_problems = approval_requirements(info_by_pid)
    if approval_problems:
        raise PolicyLoadError(approval_problems)
    try:
        policy_set = cedarpy.PolicySet.from_json_str(
            json.dumps({"staticPolicies": by_id, "templates": {}, "templateLinks": []}), release_gil=True
        )
    except ValueError as e:
        raise PolicyLoadError([f"policy set: {e}"]) from None

    try:
        entities = cedarpy.Entities.from_json_str(entities_json, schema, release_gil=True)
        raw_entities = json.loads(entities_json)
    except ValueError as e:
        raise PolicyLoadError([f"entities {source.entities_path}: {e}"]) from None
    static_uids = frozenset(
        (e["uid"]["type"], e["uid"]["id"]) for e in raw_entities if isinstance(e, dict) and "uid" in e
    )
    try:
        index = PolicyIndex(by_id, entities)
    except ValueError as e:
        raise PolicyLoadError([f"policy index: {e}"]) from None

    return PolicyBundle(
        revision=hasher.hexdigest()[:16],
        schema=schema,
        policy_set=policy_set,
        entities=entities,
        static_uids=static_uids,
        policies={pid: info_by_pid[pid] for pid in by_id},
        policy_est=by_id,
        index=index,
        loaded_at=time.time(),
        files=tuple(str(f) for f in source.files() if f.exists()),
        approvals=approvals,
        sources=sources,
    )


@dataclass
class ReloadStatus:
    ok: bool = True
    revision: str | None = None
    loaded_at: float | None = None
    last_attempt_at: float | None = None
    last_error: list[str] = field(default_factory=list)
    reloads: int = 0
    failed_reloads: int = 0

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "revision": self.revision,
            "loaded_at": self.loaded_at,
            "last_attempt_at": self.last_attempt_at,
            "last_error": self.last_error,
            "reloads": self.reloads,
            "failed_reloads": self.failed_reloads,
        }


class PolicyStore:
    """Holds the active bundle; evaluates requests against it."""

    def __init__(self, source: PolicySource) -> None:
        self.source = source
        self.status = ReloadStatus()
        self._entity_cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._fingerprint = source.fingerprint()
        self.bundle = load_bundle(source)  # the first load must succeed: fail to start, loudly
        self.status.revision = self.bundle.revision
        self.status.loaded_at = self.bundle.loaded_at
        log.info("loaded policy revision %s (%d policies)", self.bundle.revision, self.bundle.policy_count)

    def reload_if_changed(self) -> bool | None:
        """Reload when input files changed. True: swapped; False: rejected; None: unchanged."""
        fp = self.source.fingerprint()
        if fp == self._fingerprint:
            return None
        self._fingerprint = fp
        return self.reload()

    def reload(self) -> bool:
        self.status.last_attempt_at = time.time()
        try:
            bundle = load_bundle(self.source)
        except PolicyLoadError as e:
            self.status.ok = False
            self.status.last_error = e.problems
            self.status.failed_reloads += 1
            log.error(
                "POLICY RELOAD REJECTED; still enforcing revision %s. Problems:\n  %s",
                self.bundle.revision,
                "\n  ".join(e.problems),
            )
            return False
        except Exception as e:  # never let a reload crash the proxy
            self.status.ok = False
            self.status.last_error = [f"unexpected error: {e!r}"]
            self.status.failed_reloads += 1
            log.exception("POLICY RELOAD FAILED; still enforcing revision %s", self.bundle.revision)
            return False
        self.bundle = bundle  # the atomic swap: one reference assignment
        self.status.ok = True
        self.status.last_error = []
        self.status.revision = bundle.revision
        self.status.loaded_at = bundle.loaded_at
        self.status.reloads += 1
        log.warning("policy reloaded: now enforcing revision %s (%d policies)", bundle.revision, bundle.policy_count)
        return True

    def authorize(
        self,
        principal: dict,
        action: str,
        resource: dict,
        context: dict,
        extra_entities: list[dict],
        bundle: PolicyBundle | None = None,
    ) -> AuthzDecision:
        """Evaluate one request. Errors and NoDecision are denials."""
        b = bundle or self.bundle
        part = b.part_for(action)
        context = part.context_for(context)
        dynamic = [e for e in extra_entities if (e["uid"]["type"], e["uid"]["id"]) not in b.static_uids]
        entities = self._entities(b, dynamic) if dynamic else b.entities
        request = {
            "principal": principal["uid"],
            "action": {"type": "Action", "id": action},
            "resource": resource["uid"],
            "context": context,
        }
        result = cedarpy.is_authorized(request, part.policy_set, entities)
        diag = result.diagnostics
        errors: list[str] = []
        error_policies: list[str] = []
        for e in diag.errors:
            text = str(e)
            error_policies.extend(error_policy_ids(text))
            errors.append(sanitise_error(text))
        allowed = result.decision == cedarpy.Decision.Allow and not errors
        return AuthzDecision(allowed=allowed, reasons=list(diag.reasons), errors=errors, error_policies=error_policies)

    def _entities(self, b: PolicyBundle, dynamic: list[dict]) -> Any:
        """Static entities plus this request's principal and resource, cached by content.

        Agents tend to touch the same resources repeatedly; reusing the merged
        handle skips cedarpy's per-call entity parsing. Keyed by the bundle
        revision too, so a reload never sees stale static entities.
        """
        delta = json.dumps(dynamic, sort_keys=True, separators=(",", ":"))
        if len(b.static_uids) > ENTITY_CACHE_MAX_STATIC:
            return b.entities.with_added_json_str(delta)
        key = (b.revision, delta)
        cached = self._entity_cache.get(key)
        if cached is not None:
            self._entity_cache.move_to_end(key)
            return cached
        handle = b.entities.with_added_json_str(delta)
        self._entity_cache[key] = handle
        if len(self._entity_cache) > ENTITY_CACHE_SIZE:
            self._entity_cache.popitem(last=False)
        return handle
