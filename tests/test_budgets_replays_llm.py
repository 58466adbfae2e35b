"""A usage-priced (LLM) budget and idempotent retries (docs/limits.md, "Reserve, settle, release"):
the call that filled the budget is charged its tokens once; its retry with the same Idempotency-Key
is the replay, not forwarded to the provider and not charged its usage again, while a new call
over the budget is refused. Real proctor, real OpenAI client, the provider stub on loopback."""

from __future__ import annotations

import uuid
from decimal import Decimal

import openai
import pytest

from test_budgets_llm import DECISION_HEADER, LIMIT, env, hello, stub  # noqa: F401

pytestmark = pytest.mark.integration


def test_a_replayed_llm_call_is_not_charged_its_usage_again(env) -> None:  # noqa: F811
    agent, token = env.agent("replayer")
    client = env.forward_client(agent, token, max_retries=0)
    key = "llm-" + uuid.uuid4().hex
    prompt = hello("Replay me " + uuid.uuid4().hex)
    first = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=prompt, extra_headers={"Idempotency-Key": key})
    settled = env.budget(first.headers[DECISION_HEADER])
    assert settled["result"] == "settled" and settled["actual_source"] == "llm", settled
    # other calls fill the budget until one is refused
    for _ in range(20):
        try:
            client.chat.completions.create(model="gpt-4o-mini", messages=hello("fill"),
                                           extra_headers={"Idempotency-Key": "f-" + uuid.uuid4().hex})
        except openai.RateLimitError:
            break
    else:
        pytest.fail("the budget never filled")
    seen = len(env.stub.seen)
    again = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=prompt, extra_headers={"Idempotency-Key": key})
    assert again.headers.get("Idempotent-Replayed") == "true", dict(again.headers)
    assert again.parse().model_dump() == first.parse().model_dump()
    assert len(env.stub.seen) == seen  # not forwarded to the provider
    rec = env.budget(again.headers[DECISION_HEADER])
    assert "result" not in rec and "actual" not in rec, rec  # no reservation, nothing settled
    # the ledger is where the filling left it: one more replay changes nothing
    spent = Decimal(rec["spent"])
    assert spent <= LIMIT
    third = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=prompt, extra_headers={"Idempotency-Key": key})
    assert third.headers.get("Idempotent-Replayed") == "true"
    assert Decimal(env.budget(third.headers[DECISION_HEADER])["spent"]) == spent
    with pytest.raises(openai.RateLimitError):  # a new call is still over the budget
        client.chat.completions.create(model="gpt-4o-mini", messages=prompt,
                                       extra_headers={"Idempotency-Key": "n-" + uuid.uuid4().hex})
