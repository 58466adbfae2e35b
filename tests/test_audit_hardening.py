"""Audit trail hardening (issue #10, items 7 and 9):

- a full disk: the gate refuses writes before forwarding, every forwarded request's
  event lands (the reserve), no torn line is left, the sink recovers by itself and
  `proctor audit verify` passes with the gap declared (real tmpfs, real proxy);
- a keyed chain (HMAC-SHA256): a rewrite with recomputed hashes is detected, a chain
  restarting mid-file or a forged gap is rejected, the key never leaks.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import jsonschema
import pytest
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_for
from proxy.audit.chain import GENESIS, Chain, canonical, verify
from proxy.audit.keys import ChainKey
from proxy.audit.ocsf import OCSF_VERSION, to_ocsf
from proxy.audit.trail import AuditTrail, FileSink, Redactor

KEY = "k3y-" + "7f" * 20  # an operator's key (42 characters)
INTRUDER_KEY = "intruder-" + "00" * 20


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **(env or {})))


def record(i: int, decision: str = "allow", method: str = "POST") -> dict:
    return {"decision_id": f"d{i}", "time": "2026-11-21T10:00:00Z", "decision": decision, "method": method,
            "action": "test.item.create", "resource": 'Item::"new"', "agent": "writer-bot"}


def write_chain(path: Path, n: int, key: ChainKey | None, chain: Chain | None = None) -> list[dict]:
    chain = chain or Chain(key=key)
    events = []
    with open(path, "ab") as f:
        for i in range(n):
            ev = to_ocsf(record(i))
            f.write(chain.link(ev))
            events.append(ev)
    return events


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rewrite_with_plain_hashes(events: list[dict], start: int) -> list[str]:
    """What an intruder without the key can do: edit, then recompute every later hash."""
    import hashlib

    out = []
    prev = events[start - 1]["unmapped"]["chain"]["hash"] if start else GENESIS
    for i, ev in enumerate(events):
        if i >= start:
            ev["unmapped"]["chain"] = {"alg": "sha256", "prev": prev}
            ev["unmapped"]["chain"]["hash"] = hashlib.sha256(canonical(ev)).hexdigest()
        prev = ev["unmapped"]["chain"]["hash"]
        out.append(json.dumps(ev, separators=(",", ":")) + "\n")
    return out


# ------------------------------------------------------------------ keyed chain (unit)
def test_keyed_chain_catches_a_rewrite_with_recomputed_hashes(tmp_path):
    key = ChainKey.from_text(KEY, "test")
    path = tmp_path / "audit.jsonl"
    write_chain(path, 5, key)
    events = lines_of(path)
    assert {e["unmapped"]["chain"]["alg"] for e in events} == {"hmac-sha256"}
    assert {e["unmapped"]["chain"]["kid"] for e in events} == {key.kid}
    assert verify([path], [key]).ok

    # the intruder turns a deny into nothing-to-see and recomputes the chain with plain SHA-256
    events[2]["message"] = "nothing to see here"
    forged = tmp_path / "forged.jsonl"
    forged.write_text("".join(rewrite_with_plain_hashes(events, 2)))
    assert verify([forged]).problems  # keyed events before it: the downgrade shows even without the key
    report = verify([forged], [key])
    assert not report.ok
    assert any(p.sequence == 3 and "not keyed" in p.what for p in report.problems), report.problems

    # ... or re-signs with a key of their own (under their own key id, or claiming ours)
    intruder = ChainKey.from_text(INTRUDER_KEY, "intruder")
    for claimed_kid in (intruder.kid, key.kid):
        evs = lines_of(path)
        evs[2]["message"] = "nothing to see here"
        prev = evs[1]["unmapped"]["chain"]["hash"]
        text = []
        for i, ev in enumerate(evs):
            if i >= 2:
                ev["unmapped"]["chain"] = {"alg": "hmac-sha256", "kid": claimed_kid, "prev": prev}
                ev["unmapped"]["chain"]["hash"] = intruder.mac(canonical(ev))
            prev = ev["unmapped"]["chain"]["hash"]
            text.append(json.dumps(ev) + "\n")
        forged.write_text("".join(text))
        report = verify([forged], [key])
        assert not report.ok and {p.sequence for p in report.problems} == {3, 4, 5}, report.problems


def test_keyed_chain_cannot_be_verified_without_its_key(tmp_path):
    key = ChainKey.from_text(KEY, "test")
    path = tmp_path / "audit.jsonl"
    write_chain(path, 3, key)
    report = verify([path])
    assert not report.ok and report.needs_key and report.missing_kids == {key.kid} and not report.problems
    wrong = ChainKey.from_text(INTRUDER_KEY, "other")
    assert verify([path], [wrong]).needs_key
    # CLI: exit 2 without the key, 0 with it (from a file or a variable), 1 once tampered
    keyfile = tmp_path / "key"
    keyfile.write_text(KEY + "\n")
    keyfile.chmod(0o600)
    out = run_cli("audit", "verify", str(path))
    assert out.returncode == 2 and "no key was given" in out.stderr and KEY not in out.stdout + out.stderr
    out = run_cli("audit", "verify", "--key-file", str(keyfile), str(path))
    assert out.returncode == 0 and "ok: 3 events, sequence 1..3, keyed (HMAC-SHA256)" in out.stdout, out.stdout + out.stderr
    out = run_cli("audit", "verify", "--key-env", "AUDIT_K", "--json", str(path), env={"AUDIT_K": KEY})
    assert out.returncode == 0 and json.loads(out.stdout)["keyed"] == 3
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[2])
    out = run_cli("audit", "verify", "--key-file", str(keyfile), str(path))
    assert out.returncode == 1 and "1 event(s) missing" in out.stdout


def test_unkeyed_trail_still_verifies_with_a_warning_and_is_refused_when_a_key_is_expected(tmp_path):
    path = tmp_path / "old.jsonl"
    write_chain(path, 2, None)
    report = verify([path])
    assert report.ok and any("not keyed" in n for n in report.notes)
    key = ChainKey.from_text(KEY, "test")
    # an upgrade: the old part unkeyed, the chain continues keyed
    last = lines_of(path)[-1]
    write_chain(path, 2, None, Chain(last["metadata"]["sequence"], last["unmapped"]["chain"]["hash"], key))
    assert not verify([path], [key]).ok  # unkeyed events where a key is expected: a possible rewrite
    report = verify([path], [key], allow_unkeyed=True)
    assert report.ok and report.keyed == 2 and report.unkeyed == 2, report.problems
    # but never unkeyed events after keyed ones
    write_chain(path, 1, None, Chain(4, lines_of(path)[-1]["unmapped"]["chain"]["hash"], None))
    report = verify([path], [key], allow_unkeyed=True)
    assert [p.sequence for p in report.problems] == [5] and "after keyed events" in report.problems[0].what


def test_allow_unkeyed_never_passes_a_trail_with_no_keyed_event_when_a_key_is_given(tmp_path):
    """An intruder who rewrites every event with plain SHA-256 hashes gets no "ok" from
    an operator who verifies with the key and --allow-unkeyed (kept from the upgrade)."""
    path = tmp_path / "rewritten.jsonl"
    write_chain(path, 3, None)
    report = verify([path], [ChainKey.from_text(KEY, "test")], allow_unkeyed=True)
    assert not report.ok and "no event is keyed" in report.problems[0].what


def test_a_failed_key_write_leaves_no_key_file(tmp_path, monkeypatch):
    """A full disk at first start must not leave an empty key file that blocks every later start."""
    from proxy.audit import keys

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keys.os, "write", full)
    with pytest.raises(OSError):
        keys.generate_key_file(tmp_path / "audit-chain.key")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    key = keys.generate_key_file(tmp_path / "audit-chain.key")  # space is back: the key is created
    assert keys.read_key_file(tmp_path / "audit-chain.key").kid == key.kid
    assert [p.name for p in tmp_path.iterdir()] == ["audit-chain.key"]


def test_a_chain_restarting_mid_file_is_rejected_unless_the_writer_marked_it(tmp_path):
    key = ChainKey.from_text(KEY, "test")
    path = tmp_path / "audit.jsonl"
    write_chain(path, 3, key)
    write_chain(path, 2, key)  # someone started a fresh chain after the old events (e.g. after replacing them)
    report = verify([path], [key])
    assert [p.sequence for p in report.problems] == [1] and "restarts here" in report.problems[0].what
    marked = tmp_path / "marked.jsonl"
    write_chain(marked, 3, key)
    restart = Chain(key=key)
    restart.restart = {"reason": "no readable event at the end of audit.jsonl: a new chain starts"}
    write_chain(marked, 2, key, restart)
    report = verify([marked], [key])
    assert report.ok and any("the writer started a new chain" in n for n in report.notes), report.problems
    # the marker is covered by the key: added by hand, it does not count
    evs = lines_of(path)
    evs[3]["unmapped"]["chain"]["restart"] = {"reason": "trust me"}
    path.write_text("".join(json.dumps(e) + "\n" for e in evs))
    assert not verify([path], [key]).ok


def test_a_forged_gap_marker_does_not_hide_a_deletion(tmp_path):
    key = ChainKey.from_text(KEY, "test")
    path = tmp_path / "audit.jsonl"
    write_chain(path, 5, key)
    evs = lines_of(path)
    del evs[1:3]  # delete sequence 2 and 3, and pretend the writer could not write them
    evs[1]["unmapped"]["proctor"] = {"record": "audit", "event": "gap", "from": 2, "to": 3, "reason": "disk full"}
    path.write_text("".join(json.dumps(e) + "\n" for e in evs))
    report = verify([path], [key])
    assert not report.ok and any("missing" in p.what for p in report.problems)


def test_resume_marks_a_file_whose_end_cannot_be_read_as_a_restart(tmp_path):
    key = ChainKey.from_text(KEY, "test")
    path = tmp_path / "audit.jsonl"
    path.write_text("garbage that is not an event\n")
    chain = Chain.resume([path], key)
    assert chain.seq == 0 and chain.restart and "no readable event" in chain.restart["reason"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert Chain.resume([empty], key).restart is None


# ------------------------------------------------------------------ file sink (unit)
def test_only_rotated_audit_files_belong_to_the_trail(tmp_path):
    from proxy.audit.filesink import rotated_files

    for name in ("audit.jsonl", "audit-20261121T080242161922Z.jsonl", "audit-20261121T090242161922Z.jsonl",
                 "audit-dead-letter-splunk.jsonl", "audit-old.jsonl", "audit-2026.jsonl"):
        (tmp_path / name).write_text("")
    assert [p.name for p in rotated_files(tmp_path / "audit.jsonl")] == [
        "audit-20261121T080242161922Z.jsonl", "audit-20261121T090242161922Z.jsonl"]


def test_a_torn_last_line_is_cut_off_at_open_and_recorded(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_chain(path, 2, None)
    torn = b'{"class_uid":6003,"metadata":{"sequence":3'
    with open(path, "ab") as f:
        f.write(torn)  # a crash in the middle of a write
    sink = FileSink(path, 0, 0, 0, False, "fail_closed")
    assert path.read_bytes().endswith(b"}\n") and len(lines_of(path)) == 2
    trail = AuditTrail([sink], Redactor([], []), Chain.resume([path]), frozenset({"POST"}), 1.0)
    import asyncio

    async def start_and_emit():
        await trail.start()
        trail.emit(record(9))
        await trail.close()

    asyncio.run(start_and_emit())
    events = lines_of(path)
    repaired = events[2]["unmapped"]["proctor"]
    assert (repaired["record"], repaired["event"], repaired["removed_bytes"]) == ("audit", "repaired", len(torn))
    import hashlib

    assert repaired["removed_sha256"] == hashlib.sha256(torn).hexdigest()
    assert [e["metadata"]["sequence"] for e in events] == [1, 2, 3, 4]
    assert verify([path]).ok


def test_audit_events_about_the_trail_are_valid_ocsf():
    validator = jsonschema.Draft202012Validator(
        OcsfJsonSchemaEmbedded(get_ocsf_schema(version=OCSF_VERSION)).get_class_schema("api_activity"))
    for rec in (
        {"type": "audit", "event": "gap", "time": "2026-11-21T10:00:00.000Z", "path": "/var/lib/proctor/audit.jsonl",
         "from": 7, "to": 9, "count": 3, "decisions": {"deny": 3}, "reason": "the disk was full"},
        {"type": "audit", "event": "repaired", "time": "2026-11-21T10:00:00.000Z", "path": "/x/audit.jsonl",
         "removed_bytes": 12, "removed_sha256": "00" * 32, "reason": "an incomplete last line was cut off"},
    ):
        ev = to_ocsf(rec)
        Chain(key=ChainKey.from_text(KEY, "t")).link(ev)
        errors = list(validator.iter_errors(ev))
        assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
        assert ev["api"]["operation"] == f"proctor.audit.{rec['event']}"


# ------------------------------------------------------------- through a real proxy
def scrape(p) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{p.control_url}/metrics", timeout=5).text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def file_sink_healthy(p) -> bool:
    return scrape(p).get(("proctor_audit_sink_healthy", (("sink", "file"),))) == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs: a disk that can really fill up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs to fill a real disk needs root")
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path, leave: int = 0) -> Path:
    """Write a filler file until the disk is full (or only about `leave` bytes are free)."""
    filler = directory / f"filler-{uuid.uuid4().hex[:6]}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (65536, 4096, 1):
            while True:
                st = os.statvfs(directory)
                if leave and st.f_bavail * st.f_frsize - chunk < leave:
                    break
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def create_item(client: httpx.Client, base: str, marker: str) -> httpx.Response:
    return client.post(f"{base}/items", json={"name": marker})


def reached_upstream(upstream, marker: str) -> bool:
    return any(marker in (r.get("body") or "") for r in upstream.received())


def test_full_disk_forwarded_events_land_in_the_reserve_and_writes_stop_until_space_returns(
        proctor_factory, idp, upstream, small_disk):
    audit_file = small_disk / "audit.jsonl"
    p = proctor_factory({"audit": {"file": {"path": str(audit_file), "reserve_bytes": 64 * 1024, "min_free_bytes": 0}}})
    assert (small_disk / ".audit.jsonl.reserve").stat().st_size == 64 * 1024
    base = f"http://127.0.0.1:{upstream.port}"
    run = uuid.uuid4().hex[:8]
    writer = idp.token("writer-bot", groups=["writers"])
    with httpx.Client(proxy=p.proxy_url_with("writer-bot", writer), timeout=10) as c:
        assert create_item(c, base, f"{run}-before").status_code == 200
        filler = fill(small_disk)
        forwarded: dict[str, str] = {}  # marker -> decision id
        refused: list[str] = []
        for i in range(80):
            marker = f"{run}-full-{i}"
            r = create_item(c, base, marker)
            if r.status_code == 200:
                forwarded[marker] = r.headers["x-proctor-decision-id"]
            else:
                assert r.status_code == 503, r.text
                body = r.json()
                assert body["reasons"] == ["audit-unavailable"] and "full disk" in body["detail"], body
                refused.append(marker)
                if len(refused) >= 5:
                    break
        assert refused, "the gate never refused although the disk is full"
        # every request that was forwarded has its event in the file, written while the disk was full
        written = {e["metadata"].get("correlation_uid") for e in lines_of(audit_file)}
        assert set(forwarded.values()) <= written
        # nothing refused reached the upstream
        assert not [m for m in refused if reached_upstream(upstream, m)]
        assert all(reached_upstream(upstream, m) for m in forwarded)
        # no torn line: every line is a whole event
        raw = audit_file.read_bytes()
        assert raw.endswith(b"\n") and all(json.loads(line) for line in raw.splitlines())
        m = scrape(p)
        assert m[("proctor_audit_sink_healthy", (("sink", "file"),))] == 0
        assert m[("proctor_audit_lost_events_total", (("reason", "not_written"), ("sink", "file")))] >= len(refused)

        filler.unlink()  # space returns: the sink recovers by itself
        wait_for(lambda: file_sink_healthy(p), timeout=10, what="the file sink to recover")
        r = create_item(c, base, f"{run}-after")
        assert r.status_code == 200
        after_id = r.headers["x-proctor-decision-id"]
    wait_for(lambda: after_id in {e["metadata"].get("correlation_uid") for e in lines_of(audit_file)}, timeout=5,
             what="the event after recovery")
    assert (small_disk / ".audit.jsonl.reserve").stat().st_size == 64 * 1024  # the reserve is back
    out = run_cli("audit", "verify", "-c", str(p.config_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "were not written to this file, declared by the writer: the disk was full" in out.stdout
    assert "'deny': " in out.stdout  # what was left out: refusals, never a forwarded request
    assert scrape(p)[("proctor_audit_gap_markers_total", ())] >= 1


def test_below_the_free_space_floor_writes_are_refused_before_anything_is_lost(
        proctor_factory, idp, upstream, small_disk):
    audit_file = small_disk / "audit.jsonl"
    p = proctor_factory({"audit": {"file": {"path": str(audit_file), "reserve_bytes": 32 * 1024,
                                            "min_free_bytes": 192 * 1024}}})
    base = f"http://127.0.0.1:{upstream.port}"
    run = uuid.uuid4().hex[:8]
    writer = idp.token("writer-bot", groups=["writers"])
    reader = idp.token("reader-bot", groups=["readers"])
    with httpx.Client(proxy=p.proxy_url_with("writer-bot", writer), timeout=10) as c:
        assert create_item(c, base, f"{run}-before").status_code == 200
        filler = fill(small_disk, leave=96 * 1024)  # below the floor, with room left
        time.sleep(0.3)  # free space is checked at most every 0.25 s
        r = create_item(c, base, f"{run}-low")
        assert r.status_code == 503 and "free disk space" in r.json()["detail"], r.text
        assert not reached_upstream(upstream, f"{run}-low")
        # reads are not write methods: they still go out, and everything is recorded
        with httpx.Client(proxy=p.proxy_url_with("reader-bot", reader), timeout=10) as rc:
            assert rc.get(f"{base}/items/1").status_code == 200
        filler.unlink()
        wait_for(lambda: file_sink_healthy(p), timeout=5, what="room again")
        assert create_item(c, base, f"{run}-after").status_code == 200
    wait_for(lambda: len(lines_of(audit_file)) == 4, timeout=5, what="4 events")
    decisions = [e["unmapped"]["proctor"].get("decision") for e in lines_of(audit_file)]
    assert decisions == ["allow", "deny", "allow", "allow"]  # the refusal itself was recorded: no gap
    out = run_cli("audit", "verify", "-c", str(p.config_path))
    assert out.returncode == 0 and "not written" not in out.stdout, out.stdout + out.stderr


def test_starting_on_a_full_disk_refuses_writes_until_there_is_room(proctor_factory, idp, upstream, small_disk):
    audit_file = small_disk / "audit.jsonl"
    p = proctor_factory({"audit": {"file": {"path": str(audit_file), "reserve_bytes": 64 * 1024, "min_free_bytes": 0}}})
    p.stop()
    (small_disk / ".audit.jsonl.reserve").unlink()
    filler = fill(small_disk)
    log = p.dir / "restart.log"
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "run", "-c", str(p.config_path)], cwd=str(p.dir),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        def answers() -> bool:
            try:
                return httpx.get(f"{p.control_url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answers, timeout=30, what="proctor to answer")
        wait_for(lambda: "no room for the 65536-byte reserve" in log.read_text(), timeout=5, what="the log line")
        assert httpx.get(f"{p.control_url}/readyz", timeout=5).status_code == 503  # not ready to audit writes
        base = f"http://127.0.0.1:{upstream.port}"
        run = uuid.uuid4().hex[:8]
        writer = idp.token("writer-bot", groups=["writers"])
        with httpx.Client(proxy=p.proxy_url_with("writer-bot", writer), timeout=10) as c:
            r = create_item(c, base, f"{run}-full")
            assert r.status_code == 503 and r.json()["reasons"] == ["audit-unavailable"], r.text
            assert not reached_upstream(upstream, f"{run}-full")
            filler.unlink()
            wait_for(lambda: file_sink_healthy(p), timeout=5, what="room for the reserve")
            assert create_item(c, base, f"{run}-after").status_code == 200
        assert (small_disk / ".audit.jsonl.reserve").stat().st_size == 64 * 1024
    finally:
        proc.terminate()
        proc.wait(10)
    out = run_cli("audit", "verify", "-c", str(p.config_path))
    assert out.returncode == 0, out.stdout + out.stderr


def test_an_event_that_cannot_be_serialised_takes_no_sequence_number():
    chain = Chain()
    chain.link({"n": 1})
    with pytest.raises(TypeError):
        chain.link({"n": object()})
    ev = {"n": 2}
    chain.link(ev)
    assert ev["metadata"]["sequence"] == 2


def test_keyed_trail_through_the_proxy_detects_an_intruder_and_never_shows_the_key(proctor_factory, idp, upstream):
    p = proctor_factory({"audit": {"chain_key_env": "PROCTOR_AUDIT_KEY"}}, env={"PROCTOR_AUDIT_KEY": KEY})
    base = f"http://127.0.0.1:{upstream.port}"
    reader = idp.token("reader-bot", groups=["readers"])
    with httpx.Client(proxy=p.proxy_url_with("reader-bot", reader), timeout=10) as c:
        assert c.get(f"{base}/items/1").status_code == 200
        assert c.delete(f"{base}/items/1").status_code == 403
        assert c.get(f"{base}/items/2").status_code == 200
    path = p.dir / "state" / "audit.jsonl"
    wait_for(lambda: path.exists() and len(lines_of(path)) == 3, timeout=5, what="3 events")
    assert not (p.dir / "state" / "audit-chain.key").exists()  # the key came from the variable
    env = {"PROCTOR_AUDIT_KEY": KEY}
    out = run_cli("audit", "verify", "-c", str(p.config_path), env=env)
    assert out.returncode == 0 and "keyed (HMAC-SHA256)" in out.stdout, out.stdout + out.stderr

    # the intruder turns the denied DELETE into an allowed one and recomputes every hash
    events = lines_of(path)
    events[1]["unmapped"]["proctor"]["decision"] = "allow"
    forged = p.dir / "forged.jsonl"
    forged.write_text("".join(rewrite_with_plain_hashes(events, 1)))
    out = run_cli("audit", "verify", "-c", str(p.config_path), str(forged), env=env)
    assert out.returncode == 1 and "forged.jsonl:2 (sequence 2): not keyed" in out.stdout, out.stdout + out.stderr
    out = run_cli("audit", "verify", str(forged))  # without the key: still not ok
    assert out.returncode != 0

    p.stop()
    for where in (path, p.dir / "state" / "decisions.jsonl", p.log_path):
        assert KEY not in where.read_text(), where


def test_the_default_key_is_generated_once_with_mode_0600(proctor_factory, idp, upstream):
    p = proctor_factory()
    key_file = p.dir / "state" / "audit-chain.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    secret = key_file.read_text().strip()
    assert len(secret) == 64
    reader = idp.token("reader-bot", groups=["readers"])
    with httpx.Client(proxy=p.proxy_url_with("reader-bot", reader), timeout=10) as c:
        assert c.get(f"http://127.0.0.1:{upstream.port}/items/1").status_code == 200
    path = p.dir / "state" / "audit.jsonl"
    wait_for(lambda: path.exists() and len(lines_of(path)) == 1, timeout=5, what="an event")
    assert lines_of(path)[0]["unmapped"]["chain"]["kid"] == ChainKey.from_text(secret, "x").kid
    assert secret not in path.read_text()
    out = run_cli("audit", "verify", "-c", str(p.config_path))
    assert out.returncode == 0, out.stdout + out.stderr
