"""What docs/agents.md and the README tell an agent owner to type agrees with what `proctor
doctor` checks and with what the client matrix verifies: a new user copies the blocks
literally, and doctor must then find nothing to fix in them."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from proxy.doctor import CA_VARS, NODE_RECIPE, PROXY_VARS

ROOT = Path(__file__).resolve().parent.parent
AGENTS = (ROOT / "docs" / "agents.md").read_text()
README = (ROOT / "README.md").read_text()


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def exported_by(block: str, placeholders: dict[str, str]) -> dict[str, str]:
    """The environment a shell has after running `block` (placeholders filled in), from nothing."""
    for k, v in placeholders.items():
        block = block.replace(k, v)
    out = subprocess.run(["bash", "-c", block + "\nenv -0"], capture_output=True, env={"PATH": "/usr/bin:/bin"},
                         timeout=20)
    assert out.returncode == 0, out.stderr
    return dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)


def test_the_forward_mode_export_block_sets_what_doctor_checks():
    [block] = [b for b in blocks(AGENTS, "sh") if b.startswith("export HTTPS_PROXY=http://<agent-id>:<jwt>")]
    env = exported_by(block, {"<agent-id>:<jwt>": "bot:tok", "/path/ca.pem": "/tmp/ca.pem"})
    proxy = "http://bot:tok@127.0.0.1:8080"
    assert {v: env.get(v) for v in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY")} == dict.fromkeys(
        ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"), proxy)
    assert {v: env.get(v) for v in CA_VARS} == dict.fromkeys(CA_VARS, "/tmp/ca.pem")
    assert "NO_PROXY" not in env and "no_proxy" not in env
    assert set(PROXY_VARS) - set(env) == {"all_proxy", "ALL_PROXY"}


def test_the_readme_block_sets_what_doctor_checks():
    [block] = [b for b in blocks(README, "sh") if "export HTTPS_PROXY=http://support-bot:$TOKEN" in b]
    lines = [ln for ln in block.splitlines() if ln.startswith(("export", "unset"))]
    env = exported_by("TOKEN=tok; PWD=/w\n" + "\n".join(lines), {})
    assert {env.get(v) for v in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY")} == {
        "http://support-bot:tok@127.0.0.1:8080"}
    assert {v: env.get(v) for v in CA_VARS} == dict.fromkeys(CA_VARS, "/w/ca.pem")


def test_the_node_recipe_is_the_verified_one():
    """The versions and preload file docs/agents.md gives, doctor's fix names, and the client
    matrix installs (tests/node) are the same."""
    pkg = json.loads((ROOT / "tests" / "node" / "package.json").read_text())["dependencies"]
    install = f"npm install undici@{pkg['undici']} global-agent@{pkg['global-agent']}"
    assert install in AGENTS and install in NODE_RECIPE
    [doc_cjs] = [b for b in blocks(AGENTS, "js") if b.startswith("// proctor-proxy.cjs")]
    code = [ln.split("//")[0].rstrip() for ln in doc_cjs.splitlines()]
    tested = [ln.split("//")[0].rstrip() for ln in (ROOT / "tests" / "node" / "proctor-proxy.cjs").read_text().splitlines()]
    assert [ln for ln in code if ln] == [ln for ln in tested if ln and ln != "'use strict';"]
    assert 'export NODE_OPTIONS="--require /opt/proctor-node/proctor-proxy.cjs"' in AGENTS
    assert 'NODE_OPTIONS="--require /opt/proctor-node/proctor-proxy.cjs"' in NODE_RECIPE
