"""`proctor policy validate|fmt|test` on good and bad input, with their exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATA

ROOT = Path(__file__).resolve().parent.parent


def proctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def pdir(tmp_path) -> Path:
    d = tmp_path / "policies"
    shutil.copytree(DATA / "policies", d)
    return d


# ---------------------------------------------------------------- validate
def test_validate_ok(pdir):
    out = proctor("policy", "validate", "--dir", str(pdir))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok: ")


@pytest.mark.parametrize(
    "text, message",
    [
        ('@id("x")\npermit (principal, action, resource', "syntax error"),
        ('@id("x")\npermit (principal, action == Action::"no.such", resource);\n', "schema validation"),
        ("permit (principal, action, resource);\n", "@id"),
        ('@id("agents-read-items")\npermit (principal, action, resource);\n', "duplicate @id"),
        ('@id("ugly") permit(principal,action,resource);\n', "not formatted"),
    ],
    ids=["syntax", "schema-violation", "missing-id", "duplicate-id", "unformatted"],
)
def test_validate_rejects(pdir, text, message):
    (pdir / "extra.cedar").write_text(text)
    out = proctor("policy", "validate", "--dir", str(pdir))
    assert out.returncode == 1
    assert message in out.stderr


def test_bundled_policies_are_valid_and_formatted():
    out = proctor("policy", "validate")
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------- fmt
def test_fmt_check_then_fix(pdir):
    ugly = '// keep me\n@id("ugly") permit(principal,action==Action::"test.item.read",resource);\n'
    (pdir / "ugly.cedar").write_text(ugly)
    check = proctor("policy", "fmt", "--check", "--dir", str(pdir))
    assert check.returncode == 1 and "would reformat" in check.stdout
    assert (pdir / "ugly.cedar").read_text() == ugly  # --check changes nothing
    fix = proctor("policy", "fmt", "--dir", str(pdir))
    assert fix.returncode == 0 and "reformatted" in fix.stdout
    text = (pdir / "ugly.cedar").read_text()
    assert "// keep me" in text and 'action == Action::"test.item.read"' in text
    assert proctor("policy", "fmt", "--check", "--dir", str(pdir)).returncode == 0
    assert proctor("policy", "validate", "--dir", str(pdir)).returncode == 0


def test_fmt_syntax_error_exits_2(pdir):
    (pdir / "bad.cedar").write_text("permit (")
    out = proctor("policy", "fmt", "--dir", str(pdir))
    assert out.returncode == 2 and "cannot be parsed" in out.stderr


# ---------------------------------------------------------------- test
CTX = {
    "method": "GET", "path": "/items/1", "query": "", "host": "h", "port": 443, "headers": {},
    "connector": "testsvc", "risk": "low",
    "time": {"now": {"__extn": {"fn": "datetime", "arg": "2026-01-01T00:00:00Z"}}, "epoch": 5, "hour": 0, "weekday": 4},
    "source_ip": {"__extn": {"fn": "ip", "arg": "127.0.0.1"}}, "mode": "forward",
}


def case(action: str, decision: str, reason: list[str], **extra) -> dict:
    c = {
        "request": {"principal": 'Agent::"bot"', "action": f'Action::"{action}"', "resource": 'Item::"1"', "context": CTX},
        "entities": [{"uid": {"type": "Agent", "id": "bot"}, "attrs": {}, "parents": []}],
        "decision": decision,
        "reason": reason,
        "num_errors": 0,
    }
    c.update(extra)
    return c


def write_tests(pdir: Path, cases: list[dict]) -> Path:
    (pdir / "tests").mkdir(exist_ok=True)
    f = pdir / "tests" / "t.test.json"
    f.write_text(json.dumps(cases))
    return f


def test_policy_test_passes(pdir):
    write_tests(pdir, [
        case("test.item.read", "allow", ["agents-read-items"], name="reads are allowed"),
        case("test.item.delete", "deny", ["no-item-deletes"]),
        # an evaluation error: Cedar allows (the forbid errors), Proctor would deny
        {**case("test.boom", "allow", ["permit-boom"]), "num_errors": 1},
    ])
    out = proctor("policy", "test", "--dir", str(pdir), "-v")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 passed, 0 failed" in out.stdout
    assert "Proctor denies this request" in out.stdout


def test_policy_test_failure_shows_a_diff(pdir):
    write_tests(pdir, [case("test.item.delete", "allow", ["agents-read-items"], name="wrong expectation")])
    out = proctor("policy", "test", "--dir", str(pdir))
    assert out.returncode == 1
    assert "FAIL" in out.stdout and "wrong expectation" in out.stdout
    assert "decision: expected allow, got deny" in out.stdout
    assert "expected but not determining: agents-read-items" in out.stdout
    assert "determining but not expected: no-item-deletes" in out.stdout


def test_policy_test_entities_from_file_and_has_error(pdir):
    (pdir / "tests").mkdir()
    (pdir / "tests" / "ents.json").write_text(json.dumps([{"uid": {"type": "Agent", "id": "bot"}, "attrs": {}, "parents": []}]))
    c = case("test.boom", "allow", ["permit-boom"])
    del c["num_errors"]
    c.update(entities="ents.json", has_error=True)
    write_tests(pdir, [c])
    out = proctor("policy", "test", "--dir", str(pdir))
    assert out.returncode == 0, out.stdout + out.stderr


def test_policy_test_request_must_match_schema_unless_told(pdir):
    c = case("test.item.read", "allow", ["agents-read-items"])
    c["request"]["context"] = {"method": "GET"}  # incomplete for the schema
    f = write_tests(pdir, [c])
    strict = proctor("policy", "test", "--dir", str(pdir), str(f))
    assert strict.returncode == 1 and "request rejected" in strict.stdout
    lax = proctor("policy", "test", "--dir", str(pdir), "--no-validate-request", str(f))
    assert lax.returncode == 0, lax.stdout


@pytest.mark.parametrize(
    "content, message",
    [("not json", "not valid JSON"), ('{"a": 1}', "JSON list"), ('[{"request": {}, "decision": "allow"}]', "request.principal"),
     ('[{"request": {"principal": "A::\\"a\\"", "action": "Action::\\"x\\"", "resource": "R::\\"r\\""}, "decision": "maybe"}]', "decision")],
    ids=["not-json", "not-a-list", "no-principal", "bad-decision"],
)
def test_policy_test_bad_file_exits_2(pdir, content, message):
    (pdir / "tests").mkdir()
    (pdir / "tests" / "t.test.json").write_text(content)
    out = proctor("policy", "test", "--dir", str(pdir))
    assert out.returncode == 2
    assert message in out.stderr


def test_bundled_policy_tests_pass():
    out = proctor("policy", "test")
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_test_files_is_unusable_input_exit_2(pdir):
    """Nothing to run is not a failed case: exit 2 (as documented), naming where it looked."""
    shutil.rmtree(pdir / "tests", ignore_errors=True)
    r = proctor("policy", "test", "--dir", str(pdir))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no test files given and none in" in r.stderr and str(pdir / "tests") in r.stderr
