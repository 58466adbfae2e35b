"""Scripted demo agents. They are ordinary `requests` programs: nothing in here
knows about Proctor. They reach it only because the environment says
HTTP_PROXY/HTTPS_PROXY=http://<agent-id>:<jwt>@127.0.0.1:8080.

    python -m proxy.demo.agents support|intern|rogue
Each step prints one JSON line: {"agent", "step", "method", "url", "status", "decision_id", "detail"}.
"""

from __future__ import annotations

import json
import sys

import requests

BASE = "http://127.0.0.1:9101/api/now/table/incident"


def emit(agent: str, step: str, resp: requests.Response) -> dict:
    detail = ""
    if resp.headers.get("content-type", "").startswith("application/problem+json"):
        body = resp.json()
        detail = body.get("detail", "")
    line = {
        "agent": agent,
        "step": step,
        "method": resp.request.method,
        "url": resp.request.url,
        "status": resp.status_code,
        "decision_id": resp.headers.get("X-Proctor-Decision-Id"),
        "detail": detail,
    }
    print(json.dumps(line), flush=True)
    return line


def support() -> None:
    a = "support-bot"
    r = requests.get(BASE, timeout=10)
    emit(a, "list open incidents", r)
    r = requests.post(BASE, json={"short_description": "Printer on floor 3 offline", "assignment_group": "service-desk", "urgency": "3"}, timeout=10)
    emit(a, "open a new incident", r)
    sys_id = r.json()["result"]["sys_id"] if r.status_code == 201 else "unknown"
    r = requests.patch(f"{BASE}/{sys_id}", json={"state": "in_progress", "work_notes": "Rebooted spooler"}, timeout=10)
    emit(a, "update the incident", r)
    r = requests.delete(f"{BASE}/{sys_id}", timeout=10)
    emit(a, "delete the incident", r)
    r = requests.post("http://127.0.0.1:9/upload", data=b"customer list", timeout=10)
    emit(a, "send data to an unknown host", r)


def intern() -> None:
    r = requests.get(BASE, timeout=10)
    emit("intern-bot", "list incidents (not in the support group)", r)


def rogue() -> None:
    r = requests.get(BASE, timeout=10)
    emit("rogue-script", "call the API without a token", r)


if __name__ == "__main__":
    {"support": support, "intern": intern, "rogue": rogue}[sys.argv[1]]()
