"""Many agents at once: every decision is attributed to the right agent and resource (no cross-talk)."""

from __future__ import annotations

import random
import ssl
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.integration

AGENTS = 16
REQUESTS_PER_AGENT = 25


def test_concurrent_agents_no_cross_talk(proctor, upstream, upstream_tls, idp):
    ctx = ssl.create_default_context(cafile=str(proctor.ca_pem))
    tokens = {f"agent-{i:02d}": idp.token(f"agent-{i:02d}", groups=["writers"] if i % 2 == 0 else ["readers"]) for i in range(AGENTS)}
    writers = {a for i, a in enumerate(tokens) if i % 2 == 0}

    def run(agent: str) -> list[tuple[str, str, int, str]]:
        rng = random.Random(agent)
        out = []
        with httpx.Client(proxy=proctor.proxy_url_with(agent, tokens[agent]), verify=ctx, timeout=20) as c:
            for _ in range(REQUESTS_PER_AGENT):
                item = str(rng.randrange(10_000))
                tls = rng.random() < 0.5
                base = f"https://localhost:{upstream_tls.port}" if tls else f"http://127.0.0.1:{upstream.port}"
                if rng.random() < 0.5:
                    r = c.get(f"{base}/items/{item}")
                    out.append((agent, f'Item::"{item}"', r.status_code, r.headers["x-proctor-decision-id"]))
                else:  # only writers may create: a mixed-up identity would show here
                    r = c.post(f"{base}/items", json={"amount": int(item) % 900})
                    out.append((agent, 'Item::"new"', r.status_code, r.headers["x-proctor-decision-id"]))
        return out

    with ThreadPoolExecutor(max_workers=AGENTS) as pool:
        results = [row for rows in pool.map(run, tokens) for row in rows]

    assert len(results) == AGENTS * REQUESTS_PER_AGENT
    records = {r["decision_id"]: r for r in proctor.decisions()}
    created = refused = 0
    for agent, resource, status, decision_id in results:
        rec = records[decision_id]
        assert rec["agent"] == agent
        assert rec["resource"] == resource
        if resource == 'Item::"new"':
            expected = 200 if agent in writers else 403
            created += expected == 200
            refused += expected == 403
        else:
            expected = 200  # every agent may read items
        assert status == expected, (agent, resource, rec)
    assert len({d for *_, d in results}) == len(results)  # decision ids are unique
    assert created > 20 and refused > 20
