"""`proctor demo` end to end (fixed default ports: skipped if they are taken)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from proxy.demo import MOCK_PORT, port_free

pytestmark = pytest.mark.integration


def test_demo_runs_and_explains_each_call(tmp_path):
    busy = [p for p in (8080, 8081, MOCK_PORT) if not port_free(p)]
    if busy:
        pytest.skip(f"demo ports {busy} are in use on this machine")
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "demo"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "7 calls: 3 allowed, 4 refused." in text
    assert "agents-never-delete-incidents" in text
    assert "egress-default-deny" in text
    assert "no policy permits it (default deny)" in text
    assert (tmp_path / ".proctor" / "decisions.jsonl").exists()
