"""Errors a new user meets on the way through the docs say what to do, run as the user runs
them: the `proctor` CLI as a subprocess."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def proctor(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, cwd=str(cwd),
                          timeout=60)


def test_run_with_only_some_bundled_connectors_says_why_the_bundled_policies_fail(tmp_path):
    """connectors_dir with one connector and the bundled policies: the schema is generated from
    the connectors, so the other connectors' actions are unknown; the error says so, not only
    dozens of schema lines."""
    (tmp_path / "connectors").mkdir()
    shutil.copy(REPO / "connectors" / "ticketing.yaml", tmp_path / "connectors")
    (tmp_path / "proctor.yaml").write_text(f"state_dir: {tmp_path / 'state'}\nconnectors_dir: connectors\n")
    done = proctor(tmp_path, "run", "-c", "proctor.yaml")
    assert done.returncode == 1
    assert "policies cannot be loaded, refusing to start" in done.stderr
    assert "unrecognized action" in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert f"no connector in connectors_dir ({tmp_path / 'connectors'}) declares" in last
    assert "the bundled policies are for the bundled connectors" in last and "policies.dir" in last


def test_a_config_file_that_does_not_exist_says_what_to_pass(tmp_path):
    done = proctor(tmp_path, "policy", "suggest", "-c", "proctor.yaml")
    assert done.returncode != 0
    assert "config file not found: proctor.yaml (pass the file `proctor run -c` uses" in done.stderr
    assert "leave out -c for the embedded default" in done.stderr
