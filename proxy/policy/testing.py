"""`proctor policy test`: run policy test files in the Cedar CLI's run-tests JSON format.

A test file is a JSON list of cases:

```json
[{"name": "support may read incidents",
  "request": {"principal": "Agent::\\"bot\\"", "action": "Action::\\"ticketing.incident.read\\"",
              "resource": "Incident::\\"1\\"", "context": {...}},
  "entities": [...] or "entities.json",
  "decision": "allow", "reason": ["support-read-incidents"], "num_errors": 0}]
```

`entities` may be inline or a path relative to the test file; `has_error`
(bool) may stand in for `num_errors`. Reasons are policy `@id`s. Requests are
validated against the schema, as the Cedar CLI does when given one, so a typo in
a test's context is an error rather than a silently different request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cedarpy

from .engine import PolicyBundle


class TestFileError(Exception):
    """A test file that cannot be read as the run-tests format; the message says where."""


@dataclass
class CaseResult:
    file: str
    index: int
    name: str
    passed: bool
    problems: list[str] = field(default_factory=list)
    note: str = ""


def _uid(value: Any, where: str) -> Any:
    if isinstance(value, str) and "::" in value:
        return value
    if isinstance(value, dict) and isinstance(value.get("type"), str) and isinstance(value.get("id"), str):
        return value
    raise TestFileError(f"{where}: expected an entity uid such as 'Agent::\"bot\"' or {{\"type\": ..., \"id\": ...}}")


def load_cases(path: Path) -> list[dict]:
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise TestFileError(f"{path}: {e}") from None
    except ValueError as e:
        raise TestFileError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(doc, list):
        raise TestFileError(f"{path}: a test file is a JSON list of cases")
    for i, case in enumerate(doc):
        where = f"{path} case {i}" + (f" ({case.get('name')})" if isinstance(case, dict) and case.get("name") else "")
        if not isinstance(case, dict):
            raise TestFileError(f"{where}: a case is a JSON object")
        unknown = set(case) - {"name", "request", "entities", "decision", "reason", "num_errors", "has_error"}
        if unknown:
            raise TestFileError(f"{where}: unknown keys {sorted(unknown)}")
        req = case.get("request")
        if not isinstance(req, dict):
            raise TestFileError(f"{where}: 'request' must be an object")
        for part in ("principal", "action", "resource"):
            _uid(req.get(part), f"{where}: request.{part}")
        if not isinstance(req.get("context", {}), dict):
            raise TestFileError(f"{where}: request.context must be an object")
        if case.get("decision") not in ("allow", "deny"):
            raise TestFileError(f"{where}: 'decision' must be \"allow\" or \"deny\"")
        if not isinstance(case.get("reason", []), list):
            raise TestFileError(f"{where}: 'reason' must be a list of policy @ids")
        if "entities" in case and not isinstance(case["entities"], (list, str)):
            raise TestFileError(f"{where}: 'entities' must be a list or a file path")
    return doc


def _entities(case: dict, base: Path, schema: Any, where: str) -> Any:
    raw = case.get("entities", [])
    if isinstance(raw, str):
        try:
            raw = json.loads((base / raw).read_text())
        except (OSError, ValueError) as e:
            raise TestFileError(f"{where}: entities file {raw!r}: {e}") from None
    try:
        return cedarpy.Entities.from_json_str(json.dumps(raw), schema)
    except ValueError as e:
        raise TestFileError(f"{where}: entities do not match the schema: {e}") from None


def run_case(
    bundle: PolicyBundle, case: dict, base: Path, file: str, index: int, validate_request: bool = True
) -> CaseResult:
    name = case.get("name") or f"case {index}"
    where = f"{file} {name}"
    entities = _entities(case, base, bundle.schema, where)
    req = case["request"]
    request = {
        "principal": req["principal"],
        "action": req["action"],
        "resource": req["resource"],
        "context": req.get("context", {}),
    }
    result = cedarpy.is_authorized(
        request, bundle.policy_set, entities, schema=bundle.schema if validate_request else None
    )
    if result.decision == cedarpy.Decision.NoDecision:  # the request itself is invalid
        msg = "; ".join(str(e) for e in result.diagnostics.errors) or "no decision"
        return CaseResult(file=file, index=index, name=name, passed=False, problems=[f"request rejected: {msg}"])
    actual_decision = "allow" if result.decision == cedarpy.Decision.Allow else "deny"
    actual_reasons = sorted(result.diagnostics.reasons)
    # Test data is the author's own, not an agent's: show Cedar's messages in full.
    errors = [str(e) for e in result.diagnostics.errors]
    problems: list[str] = []
    if actual_decision != case["decision"]:
        problems.append(f"decision: expected {case['decision']}, got {actual_decision}")
    expected_reasons = sorted(case.get("reason", []))
    if actual_reasons != expected_reasons:
        missing = sorted(set(expected_reasons) - set(actual_reasons))
        extra = sorted(set(actual_reasons) - set(expected_reasons))
        detail = []
        if missing:
            detail.append(f"expected but not determining: {', '.join(missing)}")
        if extra:
            detail.append(f"determining but not expected: {', '.join(extra)}")
        problems.append("reasons: " + "; ".join(detail))
    if "num_errors" in case and case["num_errors"] != len(errors):
        problems.append(f"errors: expected {case['num_errors']}, got {len(errors)}" + (f": {'; '.join(errors)}" if errors else ""))
    elif "has_error" in case and bool(case["has_error"]) != bool(errors):
        problems.append(f"errors: expected has_error={case['has_error']}, got {len(errors)}" + (f": {'; '.join(errors)}" if errors else ""))
    note = ""
    if actual_decision == "allow" and errors:
        note = "Proctor denies this request: any evaluation error is a denial (fail closed)"
    return CaseResult(file=file, index=index, name=name, passed=not problems, problems=problems, note=note)


def run_files(bundle: PolicyBundle, files: list[Path], validate_request: bool = True) -> list[CaseResult]:
    results = []
    for f in files:
        for i, case in enumerate(load_cases(f)):
            try:
                results.append(run_case(bundle, case, f.parent, str(f), i, validate_request))
            except ValueError as e:  # request does not validate against the schema, etc.
                name = case.get("name") or f"case {i}"
                results.append(CaseResult(str(f), i, name, False, [f"request rejected: {e}"]))
    return results
