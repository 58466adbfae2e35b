"""The `handoff` webhook event (approvals/notify.py Notifier.notify_handoff): which hooks get
it, and what they get (the delivery itself is the Notifier's, tested in test_notify.py and
end to end in test_claims_handoff.py)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.approvals.notify import Notifier, WebhookConfig
from proxy.record.model import ClaimEvent
from proxy.store.claims import Claim


def event(to_queue: str | None = None) -> dict:
    claim = Claim("clm_old", "ticketing", 'Incident::"INC1"', "bot-1", [], "exclusive", 1.0, 100.0, 1)
    return ClaimEvent.of("handoff", claim, 50.0, to=None if to_queue else "bot-2", to_queue=to_queue, by="bot-1",
                         new_claim_id="clm_new", fence=2, decision_id="d1").to_dict()


def queued(n: Notifier) -> list[list]:
    return [[h.queue.get_nowait() for _ in range(h.queue.qsize())] for h in n._hooks]


def test_handoff_goes_to_subscribed_hooks_only() -> None:
    async def body() -> None:
        n = Notifier([
            WebhookConfig(url="http://h/a", events=["handoff"]),
            WebhookConfig(url="http://h/b", events=["requested"]),  # not subscribed
            WebhookConfig(url="http://h/c", events=["handoff"], groups=["service-desk"]),  # that group only
            WebhookConfig(url="http://h/d", events=["handoff"], format="slack"),
        ], "http://console")
        n.notify_handoff(event())
        a, b, c, d = queued(n)
        assert len(a) == 1 and b == [] and c == [] and len(d) == 1
        item = a[0]
        assert (item.family, item.event, item.approval_id) == ("claim", "handoff", "clm_old")
        assert item.payload["type"] == "proctor.claim.handoff"
        assert item.payload["claim"]["to"] == "bot-2" and item.payload["claim"]["holder"] == "bot-1"
        assert "bot-1 to bot-2" in d[0].payload["text"]
        # to a human group: the group's hook hears about it too
        n.notify_handoff(event("service-desk"))
        a, b, c, d = queued(n)
        assert len(a) == 1 and len(c) == 1 and c[0].payload["claim"]["to_queue"] == "service-desk"
        assert "the inbox of service-desk" in d[0].payload["text"]

    asyncio.run(body())


def test_slack_text_is_escaped() -> None:
    async def body() -> None:
        n = Notifier([WebhookConfig(url="http://h/d", events=["handoff"], format="slack")], None)
        ev = event()
        ev["to"] = "<!channel>"
        n.notify_handoff(ev)
        (d,) = queued(n)
        assert "<!channel>" not in d[0].payload["text"] and "&lt;!channel&gt;" in d[0].payload["text"]

    asyncio.run(body())


def test_unknown_event_names_still_refused() -> None:
    with pytest.raises(ValueError, match="unknown approval event"):
        WebhookConfig(url="http://h/a", events=["handoff", "nonsense"])
