"""Which policies ask for a human: the `@approval("group")` annotation.

    @id("po-over-10k-needs-approval")
    @approval("procurement-managers")      // who may approve
    @quorum("2")                           // optional: how many of them (default 1)
    forbid (...) when { ... }
    unless { context has approval && context.approval.groups.contains("procurement-managers") };

A deny whose determining policies all carry `@approval` is a candidate hold;
it becomes a hold only if the request would be allowed once approved (checked
by re-evaluating with a prospective approval in context), so a request that
no approval could ever let through is refused at once instead of wasting a
human's time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_GROUP_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")


@dataclass(frozen=True)
class ApprovalRequirement:
    policy_id: str
    group: str
    quorum: int


def approval_requirements(policies: dict) -> tuple[dict[str, ApprovalRequirement], list[str]]:
    """@id -> requirement for every policy with @approval, and the problems found
    (a permit with @approval, a bad group name or quorum): these make a policy set invalid."""
    out: dict[str, ApprovalRequirement] = {}
    problems: list[str] = []
    for pid, info in policies.items():
        ann = info.annotations
        if "approval" not in ann:
            if "quorum" in ann:
                problems.append(f"policy {pid!r}: @quorum without @approval")
            continue
        group = ann["approval"]
        if info.effect != "forbid":
            problems.append(f"policy {pid!r}: @approval belongs on a forbid policy (it names who can lift it)")
            continue
        if not _GROUP_RE.match(group or ""):
            problems.append(f"policy {pid!r}: @approval({group!r}) is not a valid group name")
            continue
        quorum_text = ann.get("quorum", "1")
        if not quorum_text.isdigit() or not 1 <= int(quorum_text) <= 20:
            problems.append(f"policy {pid!r}: @quorum({quorum_text!r}) must be a whole number from 1 to 20")
            continue
        out[pid] = ApprovalRequirement(pid, group, int(quorum_text))
    return out, problems


def hold_groups(reasons: list[str], requirements: dict[str, ApprovalRequirement]) -> dict[str, int] | None:
    """The groups (and quorum) a deny asks for, or None when any determining policy is not an approval policy."""
    if not reasons:
        return None  # default deny: nothing a human could lift
    groups: dict[str, int] = {}
    for pid in reasons:
        req = requirements.get(pid)
        if req is None:
            return None
        groups[req.group] = max(groups.get(req.group, 0), req.quorum)
    return groups
