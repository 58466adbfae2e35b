"""Decision record policy inputs, `proctor policy replay` and `proctor policy explain --decision`.

One module-wide Proctor (tests/data/policies) records a mix of decisions:
allowed, denied by a forbid, denied by default, and refused before any policy
ran (no credential, unknown host). Secrets are planted in the body, the query
string, the headers and MCP tool arguments of one request: none of them may
reach the record. The recorded log is then replayed against candidate policy
directories, and single decisions are explained under the current policies.

The CLI runs in-process (click's CliRunner) for speed, plus once as a real
`python -m proxy.cli` subprocess for the exit status contract.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests
import yaml
from click.testing import CliRunner

from conftest import Proctor, start_proctor, wait_for

from proxy.cli import main as proctor_cli

pytestmark = pytest.mark.integration

SECRET_BODY = "s3cr3t-BODY-7f1c"
SECRET_QUERY = "s3cr3t-QUERY-88aa"
SECRET_AUTH = "s3cr3t-AUTHZ-0d0d"
SECRET_HEADER = "s3cr3t-HEADER-4b4b"
SECRET_COOKIE = "s3cr3t-COOKIE-9e9e"
SECRET_ARGS = "s3cr3t-ARGS-c0c0"
ALL_SECRETS = (SECRET_BODY, SECRET_QUERY, SECRET_AUTH, SECRET_HEADER, SECRET_COOKIE, SECRET_ARGS)

REPORT_KEYS = {
    "candidate_revision", "considered", "replayed", "unchanged", "changed", "skipped_no_inputs", "approximate",
    "transitions", "changes",
}
CHANGE_KEYS = {
    "decision_id", "time", "agent", "action", "resource", "was", "now", "was_reasons", "now_reasons", "errors",
    "approximate",
}


# ------------------------------------------------------------------------ helpers
def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(proctor_cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def replay(p: Proctor, candidate: Path, *args: str) -> tuple[int, str, str]:
    return cli("policy", "replay", "-c", str(p.config_path), "--candidate", str(candidate), *args)


def replay_json(p: Proctor, candidate: Path, *args: str) -> dict:
    code, out, err = replay(p, candidate, "--json", *args)
    assert code == 0, err
    return json.loads(out)


def explain(p: Proctor, decision_id: str, *args: str, config: Path | None = None) -> tuple[int, str, str]:
    return cli("policy", "explain", "--decision", decision_id, "-c", str(config or p.config_path), *args)


def copy_policies(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def remove_policy(path: Path, policy_id: str) -> None:
    """Drop one `@id(...)`-annotated policy (up to the next policy) from a file."""
    text = path.read_text()
    new = re.sub(r'@id\("' + re.escape(policy_id) + r'"\).*?(?=@id\(|\Z)', "", text, count=1, flags=re.S)
    assert new != text, f"{policy_id} not found in {path}"
    path.write_text(new)


def order_body(total: float, note: str = "") -> dict:
    body: dict = {"order": {"total": total, "items": [{"sku": "A-1"}]}}
    if note:
        body["note"] = note
    return body


# ------------------------------------------------------------------------ the recorded log
@pytest.fixture(scope="module")
def rp(tmp_path_factory, idp, pki, upstream, upstream_tls) -> Proctor:
    p = start_proctor(tmp_path_factory.mktemp("replay-proctor"), idp, pki, upstream, upstream_tls)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def mix(rp, idp, upstream) -> dict:
    """Drive the proxy; returns {name: decision_id} plus the agent tokens used."""
    reader = idp.token("rp-reader", groups=["readers"], ttl=600)
    writer = idp.token("rp-writer", groups=["writers"], ttl=600)
    as_reader = {"http": rp.proxy_url_with("rp-reader", reader)}
    as_writer = {"http": rp.proxy_url_with("rp-writer", writer)}
    base = f"http://127.0.0.1:{upstream.port}"
    ids: dict[str, str] = {}

    def go(name: str, expect: int, method: str, url: str, proxies: dict, **kw) -> None:
        r = requests.request(method, url, proxies=proxies, timeout=10, **kw)
        assert r.status_code == expect, (name, r.status_code, r.text)
        ids[name] = r.headers["x-proctor-decision-id"]

    go("read_ok", 200, "GET", f"{base}/items/1", as_reader)
    go("secret_default_deny", 403, "GET", f"{base}/secret/1", as_reader)
    # denied by the forbid orders-over-1000-forbidden, secrets everywhere
    go(
        "big_order", 403, "POST", f"{base}/tenants/7/orders?dry_run=false&api_key={SECRET_QUERY}", as_writer,
        json=order_body(5000, SECRET_BODY),
        headers={"Authorization": f"Bearer {SECRET_AUTH}", "X-Api-Key": SECRET_HEADER, "Cookie": f"sid={SECRET_COOKIE}"},
    )
    go("big_order2", 403, "POST", f"{base}/tenants/8/orders", as_writer, json=order_body(1500))
    go("small_order", 200, "POST", f"{base}/tenants/7/orders", as_writer, json=order_body(10))
    # a reader's big order: forbidden too, and still denied (by default) without the forbid
    go("reader_big_order", 403, "POST", f"{base}/tenants/7/orders", as_reader, json=order_body(5000))
    go("item_create", 200, "POST", f"{base}/items", as_writer, json={"amount": 5, "note": "hi"})
    go("delete", 403, "DELETE", f"{base}/items/1", as_reader)
    go(
        "mcp_call", 200, "POST", f"{base}/mcp", as_writer,
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/call",
              "params": {"name": "create_ticket", "arguments": {"priority": 3, "title": SECRET_ARGS}}},
    )
    go("no_token", 407, "GET", f"{base}/items/1", {"http": rp.proxy_url})
    go("egress", 403, "GET", "http://unknown-host.invalid/x", as_reader)
    wait_for(lambda: {d["decision_id"] for d in rp.decisions()} >= set(ids.values()), timeout=10, what="decision records")
    return {"ids": ids, "tokens": (reader, writer)}


POLICY_DECIDED = ("read_ok", "secret_default_deny", "big_order", "big_order2", "small_order", "reader_big_order",
                  "item_create", "delete", "mcp_call")
BEFORE_POLICY = ("no_token", "egress")


@pytest.fixture(scope="module")
def same(rp, tmp_path_factory) -> Path:
    return copy_policies(rp.policies_dir, tmp_path_factory.mktemp("cand-same") / "policies")


@pytest.fixture(scope="module")
def no_big_order_forbid(rp, tmp_path_factory) -> Path:
    d = copy_policies(rp.policies_dir, tmp_path_factory.mktemp("cand-noforbid") / "policies")
    remove_policy(d / "orders.cedar", "orders-over-1000-forbidden")
    return d


# ------------------------------------------------------------------------ the record itself
def test_record_holds_policy_decision_and_sanitised_inputs(rp, mix):
    ids = mix["ids"]
    recs = {name: rp.decision(did) for name, did in ids.items()}
    assert recs["read_ok"]["policy_decision"] == "allow"
    assert recs["secret_default_deny"]["policy_decision"] == "deny"
    assert recs["big_order"]["policy_decision"] == "deny"
    assert recs["big_order"]["reasons"] == ["orders-over-1000-forbidden"]
    for name in POLICY_DECIDED:
        cedar = recs[name]["cedar"]
        assert set(cedar) <= {"principal", "resource", "context", "unrecorded"}, name
        assert not {"body", "arguments"} & set(cedar["context"]), name
        assert cedar["context"].get("query", "") == "", name  # kept only when empty
    for name in BEFORE_POLICY:
        assert "cedar" not in recs[name] and "policy_decision" not in recs[name], name

    big = recs["big_order"]["cedar"]
    assert big["principal"]["uid"] == {"type": "Agent", "id": "rp-writer"}
    assert big["principal"]["parents"] == [{"type": "AgentGroup", "id": "writers"}]
    assert big["resource"]["uid"] == {"type": "Order", "id": "new"}
    # typed values the connector declares are kept; the raw body and query are not
    ctx = big["context"]
    assert ctx["params"] == {"tenant": 7} and ctx["query_params"] == {"dry_run": False}
    assert ctx["fields"]["total"] == {"__extn": {"fn": "decimal", "arg": "5000.0"}}
    assert sorted(big["unrecorded"]) == ["body", "query"]
    assert set(ctx["headers"]) <= {"content-type", "user-agent", "idempotency-key", "x-request-id"}
    # MCP: the tool call is kept, its arguments are not
    mcp = recs["mcp_call"]
    assert mcp["cedar"]["context"]["rpc"]["tool"] == "create_ticket"
    assert mcp["cedar"]["context"]["fields"] == {"priority": 3}
    assert sorted(mcp["cedar"]["unrecorded"]) == ["arguments", "body"]
    # a GET without a query string or body drops nothing
    assert "unrecorded" not in recs["read_ok"]["cedar"]


def test_record_never_holds_raw_body_query_headers_or_tokens(rp, mix):
    text = (rp.dir / "state" / "decisions.jsonl").read_text()
    for secret in ALL_SECRETS:
        assert secret not in text, secret
    for token in mix["tokens"]:
        assert token not in text
        assert token.split(".")[2] not in text  # not even the signature
    assert "api_key" not in text


# ------------------------------------------------------------------------ replay
def test_replay_identical_policies_changes_nothing(rp, mix, same):
    report = replay_json(rp, same)
    assert set(report) == REPORT_KEYS
    assert report["considered"] >= len(mix["ids"])
    assert report["changed"] == 0 and report["changes"] == [] and report["transitions"] == {}
    assert report["replayed"] == report["unchanged"] == len(POLICY_DECIDED)
    assert report["skipped_no_inputs"] == len(BEFORE_POLICY)
    # no-big-orders (test.item.create) reads context.body, which the record dropped for item_create
    assert report["approximate"] == 1
    # the revision is a content hash: a copy elsewhere is the very revision the proxy enforced
    assert report["candidate_revision"] == rp.decision(mix["ids"]["read_ok"])["policy_revision"]

    code, out, err = replay(rp, same, "--fail-on-change")
    assert code == 0, err
    assert f"{len(POLICY_DECIDED)} decisions replayed, {len(POLICY_DECIDED)} unchanged, 0 would change" in out
    assert f"{len(BEFORE_POLICY)} skipped" in out
    assert "1 replayed decisions are approximate" in out


def test_replay_removed_forbid_flips_exactly_its_denials(rp, mix, no_big_order_forbid):
    ids = mix["ids"]
    report = replay_json(rp, no_big_order_forbid)
    assert report["transitions"] == {"deny->allow": 2}
    assert report["changed"] == 2 and report["unchanged"] == len(POLICY_DECIDED) - 2
    by_id = {c["decision_id"]: c for c in report["changes"]}
    assert set(by_id) == {ids["big_order"], ids["big_order2"]}
    for did in by_id:
        c = by_id[did]
        assert set(c) == CHANGE_KEYS
        assert (c["was"], c["now"]) == ("deny", "allow")
        assert c["was_reasons"] == ["orders-over-1000-forbidden"]
        assert c["now_reasons"] == ["writers-create-orders"]
        assert c["action"] == "test.order.create" and c["agent"] == "rp-writer" and c["resource"] == 'Order::"new"'
        assert c["errors"] == [] and c["approximate"] is False
        assert c["time"] == rp.decision(did)["time"]
    # the reader's big order is still denied (by default now): same effect, not a change
    assert ids["reader_big_order"] not in by_id

    code, out, err = replay(rp, no_big_order_forbid)
    assert code == 0, err
    assert "2 would change" in out and re.search(r"deny->allow\s+2", out)
    for did in by_id:
        line = next(line for line in out.splitlines() if did in line)
        assert "rp-writer" in line and "test.order.create" in line
        assert "deny (orders-over-1000-forbidden) -> allow (writers-create-orders)" in line
        assert "(approximate)" not in line

    code, out, err = replay(rp, no_big_order_forbid, "--limit", "1")
    assert code == 0 and "... and 1 more (use --json or --limit)" in out
    assert sum(did in out for did in by_id) == 1


def test_replay_fail_on_change_exit_1(rp, mix, no_big_order_forbid):
    code, out, err = replay(rp, no_big_order_forbid, "--fail-on-change")
    assert code == 1
    assert "2 would change" in out


def test_replay_exit_status_of_the_real_command(rp, mix, no_big_order_forbid, same):
    def run(candidate: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", "policy", "replay", "-c", str(rp.config_path), "--candidate", str(candidate), *args],
            capture_output=True, text=True, timeout=60,
        )

    changed = run(no_big_order_forbid, "--fail-on-change", "--json")
    assert changed.returncode == 1, changed.stderr
    assert json.loads(changed.stdout)["changed"] == 2
    assert run(same, "--fail-on-change").returncode == 0


def test_replay_marks_unrecorded_reads_approximate(rp, mix, tmp_path):
    ids = mix["ids"]
    # without no-big-orders nothing read for test.item.create touches context.body: exact
    c0 = copy_policies(rp.policies_dir, tmp_path / "c0")
    remove_policy(c0 / "items.cedar", "no-big-orders")
    r0 = replay_json(rp, c0)
    assert r0["approximate"] == 0 and r0["changed"] == 0

    # a new forbid reading context.body for the action: item_create (recorded with a body) is approximate;
    # the orders and MCP calls also dropped a body, but no policy of theirs reads it
    c1 = copy_policies(c0, tmp_path / "c1")
    (c1 / "notes.cedar").write_text(
        '@id("no-hi-notes")\nforbid (\n  principal,\n  action == Action::"test.item.create",\n  resource\n)\n'
        'when { context has body && context.body has note && context.body.note == "hi" };\n'
    )
    r1 = replay_json(rp, c1)
    assert r1["approximate"] == 1
    assert r1["changed"] == 0  # the body is gone: replay cannot see the note, hence approximate
    code, out, _ = replay(rp, c1)
    assert code == 0 and "1 replayed decisions are approximate" in out

    # a candidate permit that needs the body: the change it causes is listed as approximate
    c2 = copy_policies(c0, tmp_path / "c2")
    remove_policy(c2 / "items.cedar", "writers-create-items")
    (c2 / "create.cedar").write_text(
        '@id("writers-create-items-with-body")\npermit (\n  principal in AgentGroup::"writers",\n'
        '  action == Action::"test.item.create",\n  resource is Item\n)\nwhen { context has body };\n'
    )
    r2 = replay_json(rp, c2)
    assert r2["transitions"] == {"allow->deny": 1}
    (change,) = r2["changes"]
    assert change["decision_id"] == ids["item_create"] and change["approximate"] is True
    assert change["was_reasons"] == ["writers-create-items"] and change["now_reasons"] == []
    code, out, _ = replay(rp, c2)
    line = next(line for line in out.splitlines() if ids["item_create"] in line)
    assert line.endswith("(approximate)") and "allow (writers-create-items) -> deny (default)" in line


def test_replay_time_window(rp, mix, same):
    ids = mix["ids"]
    future = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    r = replay_json(rp, same, "--since", future)
    assert r["considered"] == r["replayed"] == r["changed"] == 0
    code, out, _ = replay(rp, same, "--since", future)
    assert code == 0 and "0 decisions replayed" in out

    assert replay_json(rp, same, "--until", "2000-01-01T00:00:00Z")["considered"] == 0
    assert replay_json(rp, same, "--since", "1d")["considered"] == replay_json(rp, same)["considered"]

    # --since is inclusive, --until exclusive, on the record's own time
    pivot = rp.decision(ids["big_order"])["time"]
    times = [d["time"] for d in rp.decisions() if "type" not in d]
    after = replay_json(rp, same, "--since", pivot)
    before = replay_json(rp, same, "--until", pivot)
    assert after["considered"] == sum(t >= pivot for t in times)
    assert before["considered"] == sum(t < pivot for t in times)
    assert after["considered"] + before["considered"] == len(times)


def test_replay_skips_and_names_lines_that_are_not_records(rp, mix, same, tmp_path):
    """A torn last line (a crash) and a hand-edited line are skipped, counted and named;
    every real decision is still replayed."""
    path = tmp_path / "decisions.jsonl"
    good = (rp.dir / "state" / "decisions.jsonl").read_text()
    n = sum(1 for line in good.splitlines() if line.strip() and '"type"' not in line[:10])
    edited = '{"decision_id":"x","time":"2026-11-21T10:00:00Z","decision":"allow","status":"teapot"}'
    path.write_text(good + edited + "\n" + '{"decision_id":"torn","ti')
    report = replay_json(rp, same, "--decisions", str(path))
    assert report["considered"] == n and report["unreadable"] == 2 and report["changed"] == 0
    code, out, _ = replay(rp, same, "--decisions", str(path))
    lineno = len(good.splitlines()) + 1
    assert code == 0 and f"2 line(s) skipped: not decision records (first: line {lineno}: status: " in out
    assert "unreadable" not in replay_json(rp, same)  # a clean file: the report's keys as always


def test_replay_goes_on_past_a_record_cedar_refuses(rp, mix, same, tmp_path):
    """A hand-edited line whose recorded inputs Cedar cannot read (an invalid entity type) is
    skipped, counted and named; the other decisions are still replayed, and --fail-on-change
    exits 1 (a decision that cannot be replayed proves nothing)."""
    path = tmp_path / "decisions.jsonl"
    lines = (rp.dir / "state" / "decisions.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines if '"cedar"' in line]
    bad = dict(recs[0], decision_id="hand-edited")
    bad["cedar"] = json.loads(json.dumps(bad["cedar"]))
    bad["cedar"]["principal"]["uid"]["type"] = "Not A Type!"
    path.write_text("\n".join([json.dumps(bad), *lines]) + "\n")
    report = replay_json(rp, same, "--decisions", str(path))
    assert report["unevaluable"] == 1 and report["replayed"] == len(recs) and report["changed"] == 0
    code, out, _ = replay(rp, same, "--decisions", str(path))
    assert code == 0 and "1 decision(s) skipped: Cedar refuses their recorded inputs (first: decision hand-edited:" in out
    assert replay(rp, same, "--decisions", str(path), "--fail-on-change")[0] == 1
    assert "unevaluable" not in replay_json(rp, same)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--since", "yesterday"), "not a time"),
        (("--since", "2026-01-01T00:00:00"), "time zone"),
        (("--decisions", "/nonexistent/decisions.jsonl"), "cannot read the decision record"),
    ],
    ids=["unparsable-since", "naive-since", "missing-record"],
)
def test_replay_bad_input_exit_2(rp, mix, same, args, message):
    code, out, err = replay(rp, same, *args)
    assert code == 2
    assert message in err and out == ""


def test_replay_bad_candidate_exit_2(rp, mix, tmp_path):
    broken = copy_policies(rp.policies_dir, tmp_path / "broken")
    (broken / "zz.cedar").write_text('@id("oops")\npermit (principal, action, resource')
    code, out, err = replay(rp, broken)
    assert code == 2 and "syntax error" in err and out == ""

    code, _, err = replay(rp, tmp_path / "does-not-exist")
    assert code == 2 and "does not exist" in err

    no_schema = tmp_path / "no-schema"
    no_schema.mkdir()
    (no_schema / "a.cedar").write_text('@id("a")\npermit (principal, action, resource);\n')
    code, _, err = replay(rp, no_schema)
    assert code == 2 and err.startswith("error:")


def test_policy_inputs_off(proctor_factory, idp, upstream, rp, mix, same):
    p = proctor_factory({"record": {"policy_inputs": False}})
    tok = idp.token("noin-bot", groups=["readers"])
    proxies = {"http": p.proxy_url_with("noin-bot", tok)}
    ok = requests.get(f"http://127.0.0.1:{upstream.port}/items/1", proxies=proxies, timeout=10)
    denied = requests.get(f"http://127.0.0.1:{upstream.port}/secret/1?q=1", proxies=proxies, timeout=10)
    assert (ok.status_code, denied.status_code) == (200, 403)
    ids = [ok.headers["x-proctor-decision-id"], denied.headers["x-proctor-decision-id"]]
    wait_for(lambda: len(p.decisions()) >= 2, timeout=10, what="records")
    for did, expected in zip(ids, ("allow", "deny")):
        rec = p.decision(did)
        assert "cedar" not in rec
        assert rec["policy_decision"] == expected  # what Cedar said is still recorded
    report = replay_json(rp, same, "--decisions", str(p.dir / "state" / "decisions.jsonl"))
    assert report["considered"] == 2 and report["replayed"] == 0 and report["skipped_no_inputs"] == 2

    code, out, err = explain(p, ids[0])
    assert code == 2 and "without policy inputs" in err and out == ""


# ------------------------------------------------------------------------ context.query
@pytest.fixture(scope="module")
def ctx_log(tmp_path_factory, idp, pki, upstream, upstream_tls) -> dict:
    """test.ctx.read requests (ctx.cedar's ctx-forbid-query reads context.query), with and without a query string."""
    p = start_proctor(tmp_path_factory.mktemp("replay-ctx"), idp, pki, upstream, upstream_tls)
    try:
        tok = idp.token("ctx-bot", groups=["readers"], ttl=600)
        proxies = {"http": p.proxy_url_with("ctx-bot", tok)}
        ids = {}
        for name, url in (("no_query", "/ctx/1"), ("with_query", "/ctx/2?page=2")):
            r = requests.get(f"http://127.0.0.1:{upstream.port}{url}", proxies=proxies, timeout=10)
            assert r.status_code == 200, r.text
            ids[name] = r.headers["x-proctor-decision-id"]
        wait_for(lambda: len(p.decisions()) >= 2, timeout=10, what="records")
        files = {}
        for name, did in ids.items():
            files[name] = p.dir / f"{name}.jsonl"
            files[name].write_text(json.dumps(p.decision(did)) + "\n")
        yield {"proctor": p, "ids": ids, "files": files}
    finally:
        p.stop()


def test_replay_dropped_query_is_approximate(rp, same, ctx_log):
    rec = ctx_log["proctor"].decision(ctx_log["ids"]["with_query"])
    assert rec["cedar"]["unrecorded"] == ["query"] and "page=2" not in json.dumps(rec)
    report = replay_json(rp, same, "--decisions", str(ctx_log["files"]["with_query"]))
    assert report["replayed"] == 1 and report["approximate"] == 1
    assert all(c["approximate"] for c in report["changes"])


def test_replay_empty_query_is_exact(rp, same, ctx_log):
    rec = ctx_log["proctor"].decision(ctx_log["ids"]["no_query"])
    assert rec["policy_decision"] == "allow" and "unrecorded" not in rec["cedar"]
    report = replay_json(rp, same, "--decisions", str(ctx_log["files"]["no_query"]))
    assert report["replayed"] == 1 and report["approximate"] == 0
    assert report["changes"] == [], report["changes"]


# ------------------------------------------------------------------------ explain --decision
def test_explain_allowed_decision(rp, mix):
    did = mix["ids"]["read_ok"]
    code, out, err = explain(rp, did)
    assert code == 0, err
    rev = rp.decision(did)["policy_revision"]
    assert f"decision   {did} at {rp.decision(did)['time']}" in out
    assert f"GET 127.0.0.1:{rp.decision(did)['port']}/items/1" in out
    assert 'principal  Agent::"rp-reader"  (groups: readers)' in out
    assert "action     test.item.read" in out and 'resource   Item::"1"' in out
    assert f"recorded   allow (agents-read-items) under revision {rev}" in out
    assert f"now        allow (agents-read-items) under revision {rev}" in out
    assert "[policies changed since]" not in out and "approximate" not in out
    assert re.search(r"APPLIES permit\s+agents-read-items\s+\(items\.cedar\)", out)

    code, out, err = explain(rp, did, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["decision_id"] == did and doc["action"] == "test.item.read"
    assert doc["recorded"] == {"decision": "allow", "reasons": ["agents-read-items"], "policy_revision": rev, "status": 200}
    assert doc["now"] == {"decision": "allow", "reasons": ["agents-read-items"], "errors": [], "policy_revision": rev}
    assert doc["same_revision"] is True and doc["approximate_because_unrecorded"] == []
    assert {"policy_id": "agents-read-items", "effect": "permit", "file": "items.cedar", "applies": True,
            "error": None} in doc["policies"]
    assert "body" not in doc["context"] and doc["context"].get("query", "") == ""


def test_explain_denied_decision(rp, mix):
    did = mix["ids"]["big_order"]
    code, out, err = explain(rp, did)
    assert code == 0, err
    assert "recorded   deny (orders-over-1000-forbidden)" in out
    assert "now        deny (orders-over-1000-forbidden)" in out
    assert 'context.params  {"tenant": 7}' in out and 'context.query_params  {"dry_run": false}' in out
    assert re.search(r"APPLIES forbid\s+orders-over-1000-forbidden", out)
    assert re.search(r"APPLIES permit\s+writers-create-orders", out)
    assert re.search(r"-\s+forbid\s+tenant-666-no-widgets", out)
    for secret in ALL_SECRETS:
        assert secret not in out

    doc = json.loads(explain(rp, did, "--json")[1])
    assert doc["recorded"]["decision"] == doc["now"]["decision"] == "deny"
    assert doc["recorded"]["status"] == 403
    verdicts = {v["policy_id"]: v["applies"] for v in doc["policies"]}
    assert verdicts["orders-over-1000-forbidden"] is True and verdicts["writers-create-orders"] is True
    assert verdicts["dry-runs-over-500-forbidden"] is False

    # default deny
    code, out, _ = explain(rp, mix["ids"]["secret_default_deny"])
    assert code == 0 and "recorded   deny (default)" in out and "now        deny (default)" in out


def test_explain_notes_approximation(rp, mix):
    code, out, err = explain(rp, mix["ids"]["item_create"])
    assert code == 0, err
    assert "note       policies for this action read context.body" in out and "approximate" in out
    doc = json.loads(explain(rp, mix["ids"]["item_create"], "--json")[1])
    assert doc["approximate_because_unrecorded"] == ["body"]


def test_explain_under_changed_policies(rp, mix, no_big_order_forbid, tmp_path):
    # the same record, explained with a config whose policy directory is the candidate
    cfg = yaml.safe_load(rp.config_path.read_text())
    cfg["policies"]["dir"] = str(no_big_order_forbid)
    cfg["state_dir"] = str(rp.dir / "state")
    cfg["connectors_dir"] = str(rp.dir / "connectors")
    alt = tmp_path / "alt.yaml"
    alt.write_text(yaml.safe_dump(cfg))
    did = mix["ids"]["big_order"]
    code, out, err = explain(rp, did, config=alt)
    assert code == 0, err
    assert "recorded   deny (orders-over-1000-forbidden)" in out
    assert "now        allow (writers-create-orders)" in out and "[policies changed since]" in out
    doc = json.loads(explain(rp, did, "--json", config=alt)[1])
    assert doc["same_revision"] is False and doc["now"]["decision"] == "allow"
    assert "orders-over-1000-forbidden" not in {v["policy_id"] for v in doc["policies"]}


def test_explain_unknown_decision_exit_2(rp, mix):
    code, out, err = explain(rp, "01a1fd000000-00000000000000000000")
    assert code == 2 and out == ""
    assert "no decision 01a1fd000000-00000000000000000000" in err


@pytest.mark.parametrize("name, kind", [("no_token", "authentication"), ("egress", "egress")])
def test_explain_refused_before_policy_exit_2(rp, mix, name, kind):
    code, out, err = explain(rp, mix["ids"][name])
    assert code == 2 and out == ""
    assert f"refused before any policy ran ({kind}:" in err


def test_explain_decision_excludes_request_args(rp, mix):
    code, _, err = cli("policy", "explain", "--decision", mix["ids"]["read_ok"], "--agent", "x", "-c", str(rp.config_path))
    assert code == 2 and "--decision explains a recorded request" in err
