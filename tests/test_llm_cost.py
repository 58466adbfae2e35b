"""LLM spend (proxy/limits/llm_cost.py): the reservation before a call and the actual cost
from the upstream's `usage`, exact in Decimals.

Answers come from the OpenAI-compatible stub (proxy/demo/mock_llm.py, served on loopback
by aiohttp's test server) and, where the stub has no such shape (cached tokens, the
Responses API's event stream), are built with the official `openai` SDK's own types, so
the field names are the SDK's, not ours.
"""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from openai.types import CompletionUsage, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import (Response, ResponseCompletedEvent, ResponseCreatedEvent, ResponseTextDeltaEvent,
                                    ResponseUsage)

from proxy.demo import mock_llm
from proxy.limits.budget_spec import LlmPrices
from proxy.limits.llm_cost import FRACTION_DIGITS, MAX_BODY_BYTES, MAX_TOKENS, llm_actual, llm_estimate, llm_model
from proxy.store.counters import check_amount

KEY = "sk-test-llm-cost"
M = Decimal(1_000_000)

PRICES = LlmPrices.model_validate({
    "currency": "USD",
    "per_tokens": 1_000_000,
    "models": {
        "gpt-4o-mini": {"input": "0.15", "output": "0.60", "cached_input": "0.075"},
        "gpt-4o*": {"input": "2.50", "output": "10.00"},
        "o1*": {"input": "15", "output": "60"},
        "text-embedding-3-small": {"input": "0.02", "output": "0"},
        "*": {"input": "5.00", "output": "15.00"},
    },
    "estimate": "0.05",
})
NO_CATCH_ALL = LlmPrices.model_validate({"models": {"gpt-4o-mini": {"input": "0.15", "output": "0.60"}},
                                         "estimate": "0.01"})


def stub(path: str, payload: dict[str, Any]) -> tuple[int, bytes, str]:
    """One call to the stub on a loopback port: (status, body, Content-Type)."""
    async def go() -> tuple[int, bytes, str]:
        async with TestServer(mock_llm.build_app(KEY), host="127.0.0.1") as server:
            async with ClientSession() as session:
                async with session.post(server.make_url(path), json=payload,
                                        headers={"Authorization": f"Bearer {KEY}"}) as resp:
                    return resp.status, await resp.read(), resp.headers["Content-Type"]
    return asyncio.run(go())


def chat_body(usage: dict[str, Any] | None, model: str = "gpt-4o-mini") -> bytes:
    """A Chat Completions answer as the SDK reads it, with this usage (total_tokens: the sum, unless given)."""
    if usage is not None and "total_tokens" not in usage:
        usage = {**usage, "total_tokens": usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)}
    doc = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
           "usage": usage}
    ChatCompletion.model_validate(doc)
    return json.dumps(doc).encode()


def sse(*docs: Any, newline: str = "\n") -> bytes:
    """An event stream: one `data:` event per document (str documents as they are)."""
    out = ""
    for doc in docs:
        data = doc if isinstance(doc, str) else json.dumps(doc)
        out += f"data: {data}{newline}{newline}"
    return out.encode()


# --- the request's model and the reservation ---

def test_model_from_fields() -> None:
    assert llm_model({"model": "gpt-4o-mini", "max_tokens": 5}) == "gpt-4o-mini"
    assert llm_model({}) is None
    assert llm_model({"model": ""}) is None
    assert llm_model({"model": 7}) is None


def test_estimate_without_max_tokens_is_the_configured_estimate() -> None:
    assert llm_estimate(PRICES, "gpt-4o-mini", {"model": "gpt-4o-mini"}) == Decimal("0.05")
    assert llm_estimate(PRICES, "gpt-4o-mini", {"model": "gpt-4o-mini", "stream": True, "n": 3}) == Decimal("0.05")


def test_estimate_reserves_the_output_price_of_max_tokens_times_n() -> None:
    # 0.05 + 0.60 * 1000 * 4 / 1M = 0.05 + 0.0024
    assert llm_estimate(PRICES, "gpt-4o-mini", {"max_tokens": 1000, "n": 4}) == Decimal("0.0524")
    assert llm_estimate(PRICES, "gpt-4o-mini", {"max_completion_tokens": 1}) == Decimal("0.0500006")
    # Responses API: max_output_tokens, no n
    assert llm_estimate(PRICES, "gpt-4o-2024-08-06", {"max_output_tokens": 200}) == Decimal("0.052")
    # both caps given: the larger is reserved (servers differ in which one wins)
    assert llm_estimate(PRICES, "gpt-4o-mini", {"max_tokens": 10, "max_completion_tokens": 1000}) == Decimal("0.0506")
    # a custom route typing it as a Cedar decimal
    assert llm_estimate(PRICES, "gpt-4o-mini", {"max_tokens": {"__extn": {"fn": "decimal", "arg": "1000.0"}}}) \
        == Decimal("0.0506")


def test_estimate_caps_the_reserved_tokens() -> None:
    # Cedar Longs reach 2**63-1; no answer is believed above MAX_TOKENS, so no reservation goes beyond it
    huge = llm_estimate(PRICES, "o1-pro", {"max_tokens": 2**63 - 1, "n": 128})
    assert huge == Decimal("0.05") + Decimal(60) * MAX_TOKENS / M
    assert huge is not None and check_amount("estimate", huge) == huge


@pytest.mark.parametrize("fields", [{"max_tokens": True}, {"max_tokens": 0}, {"max_tokens": -5}, {"max_tokens": "100"},
                                    {"max_tokens": 1.5}, {"max_tokens": 10, "n": 0}, {"max_tokens": 10, "n": False},
                                    {"max_output_tokens": {"__extn": {"fn": "decimal", "arg": "10.5"}}},
                                    {"max_tokens": [10]}])
def test_estimate_refuses_unreadable_caps(fields: dict[str, Any]) -> None:
    # the route's typing admits none of these: a misdeclared route fails closed (the stage's 503)
    with pytest.raises(ValueError):
        llm_estimate(PRICES, "gpt-4o-mini", fields)


def test_unpriced_model_has_no_estimate_and_no_actual() -> None:
    body = chat_body({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})
    assert llm_estimate(NO_CATCH_ALL, "gpt-4o", {"max_tokens": 10}) is None
    assert llm_actual(NO_CATCH_ALL, "gpt-4o", body, "application/json") is None
    # no model at all: only a catch-all "*" prices the call
    assert llm_estimate(NO_CATCH_ALL, None, {}) is None
    assert llm_estimate(PRICES, None, {"max_tokens": 100}) == Decimal("0.0515")
    assert llm_actual(PRICES, None, body, "application/json") == (10 * Decimal("5") + 5 * Decimal("15")) / M


def test_exact_prefix_and_catch_all_prices() -> None:
    body = chat_body({"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100})
    # exact id beats the "gpt-4o*" prefix
    assert llm_actual(PRICES, "gpt-4o-mini", body, "application/json") == Decimal("0.00021")
    assert llm_actual(PRICES, "gpt-4o-2024-08-06", body, "application/json") == Decimal("0.0035")
    assert llm_actual(PRICES, "o1-pro", body, "application/json") == Decimal("0.021")
    assert llm_actual(PRICES, "claude-3-5-sonnet", body, "application/json") == Decimal("0.0065")


# --- exactness ---

def test_one_token_is_exact() -> None:
    one = llm_actual(PRICES, "gpt-4o-mini", chat_body({"prompt_tokens": 1, "completion_tokens": 0,
                                                       "total_tokens": 1}), "application/json")
    assert one == Decimal("0.00000015")
    assert one is not None and format(one, "f") == "0.00000015"
    # ten times 0.1 of something is 1, not 0.9999999999999999
    tenth = LlmPrices.model_validate({"per_tokens": 10, "models": {"*": {"input": "1", "output": "0"}}})
    total = sum((llm_actual(tenth, "m", chat_body({"prompt_tokens": 1, "completion_tokens": 0}), None) or Decimal(0)
                 for _ in range(10)), Decimal(0))
    assert total == Decimal(1) and format(total, "f") == "1.0"


def test_amounts_are_never_floats_and_whole_amounts_have_no_exponent() -> None:
    big = LlmPrices.model_validate({"per_tokens": 1, "models": {"*": {"input": "1000", "output": "1000"}}})
    amount = llm_actual(big, "m", chat_body({"prompt_tokens": 3, "completion_tokens": 2}), "application/json")
    assert isinstance(amount, Decimal) and amount == 5000 and str(amount) == "5000"


def test_a_per_tokens_that_does_not_divide_rounds_up_at_the_last_digit() -> None:
    thirds = LlmPrices.model_validate({"per_tokens": 3, "models": {"*": {"input": "1", "output": "2"}}})
    amount = llm_actual(thirds, "m", chat_body({"prompt_tokens": 1, "completion_tokens": 0}), "application/json")
    assert amount == Decimal("0." + "3" * (FRACTION_DIGITS - 1) + "4")
    assert amount is not None and amount > Decimal(1) / 3 and check_amount("actual", amount) == amount
    # 1024 divides a power of ten: exact, 0.0009765625
    kib = LlmPrices.model_validate({"per_tokens": 1024, "models": {"*": {"input": "1", "output": "2"}}})
    assert llm_actual(kib, "m", chat_body({"prompt_tokens": 1, "completion_tokens": 0}), None) == Decimal("0.0009765625")


def test_the_largest_amounts_fit_the_ledger() -> None:
    dear = LlmPrices.model_validate({"per_tokens": 1, "models": {"*": {"input": "999999999999999.999999999999",
                                                                         "output": "999999999999999.999999999999"}},
                                     "estimate": "999999999999999.999999999999"})
    top = MAX_TOKENS - 1
    amount = llm_actual(dear, "m", chat_body({"prompt_tokens": top, "completion_tokens": top}), None)
    assert amount == Decimal("1999999997999999999999999.998000000002")  # 2 * 999999999 * the price, exactly
    assert amount is not None and check_amount("actual", amount) == amount
    estimate = llm_estimate(dear, "m", {"max_tokens": 2**63 - 1, "n": 128})
    assert estimate is not None and check_amount("estimate", estimate) == estimate


# --- the shapes of the answers ---

def test_chat_completion_from_the_stub() -> None:
    status, body, ctype = stub("/v1/chat/completions", {
        "model": "gpt-4o-mini", "n": 2, "messages": [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": "Price this call, please."}]})
    assert status == 200 and ctype.startswith("application/json")
    usage = ChatCompletion.model_validate_json(body).usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    expected = (usage.prompt_tokens * Decimal("0.15") + usage.completion_tokens * Decimal("0.60")) / M
    assert llm_actual(PRICES, "gpt-4o-mini", body, ctype) == expected


def test_chat_cached_tokens_are_part_of_the_prompt() -> None:
    usage = CompletionUsage.model_validate({"prompt_tokens": 2000, "completion_tokens": 100, "total_tokens": 2100,
                                            "prompt_tokens_details": {"cached_tokens": 1536, "audio_tokens": 0},
                                            "completion_tokens_details": {"reasoning_tokens": 64}})
    body = chat_body(usage.model_dump(exclude_none=True))
    # 464 at 0.15, 1536 at the cached 0.075, 100 (reasoning included) at 0.60
    assert llm_actual(PRICES, "gpt-4o-mini", body, "application/json") == Decimal("0.0002448")
    # without a cached price, cached tokens cost the input price
    assert llm_actual(PRICES, "gpt-4o", body, "application/json") == (2000 * Decimal("2.5") + 100 * Decimal(10)) / M
    # details null (some compatible servers): no cached tokens
    assert llm_actual(PRICES, "gpt-4o-mini", chat_body({"prompt_tokens": 10, "completion_tokens": 0,
                                                        "prompt_tokens_details": None}), None) == Decimal("0.0000015")


def test_responses_api_from_the_stub_and_with_cached_tokens() -> None:
    status, body, ctype = stub("/v1/responses", {"model": "gpt-4o", "instructions": "Answer in one line.",
                                                 "input": "How much does this cost?", "max_output_tokens": 4})
    assert status == 200
    usage = Response.model_validate_json(body).usage  # (the SDK's own type accepts the stub's answer as is)
    assert usage is not None and usage.input_tokens > 0 and usage.output_tokens == 4
    expected = (usage.input_tokens * Decimal("2.5") + usage.output_tokens * Decimal(10)) / M
    assert llm_actual(PRICES, "gpt-4o", body, ctype) == expected

    cached = ResponseUsage.model_validate({"input_tokens": 3000, "input_tokens_details": {"cached_tokens": 2048,
                                                                                          "cache_write_tokens": 0},
                                           "output_tokens": 500, "output_tokens_details": {"reasoning_tokens": 300},
                                           "total_tokens": 3500})
    doc = json.loads(body)
    doc["usage"] = cached.model_dump()
    assert llm_actual(PRICES, "gpt-4o-mini", json.dumps(doc).encode(), ctype) == \
        (952 * Decimal("0.15") + 2048 * Decimal("0.075") + 500 * Decimal("0.60")) / M


def test_embeddings_from_the_stub() -> None:
    status, body, ctype = stub("/v1/embeddings", {"model": "text-embedding-3-small",
                                                  "input": ["first text to embed", "and a second one"]})
    assert status == 200
    usage = CreateEmbeddingResponse.model_validate_json(body).usage
    assert usage.prompt_tokens == usage.total_tokens > 0
    assert llm_actual(PRICES, "text-embedding-3-small", body, ctype) == usage.prompt_tokens * Decimal("0.02") / M


def test_chat_stream_with_include_usage_from_the_stub() -> None:
    payload = {"model": "gpt-4o-mini", "n": 2, "stream": True, "stream_options": {"include_usage": True},
               "messages": [{"role": "user", "content": "Stream a few words back to me."}]}
    status, body, ctype = stub("/v1/chat/completions", payload)
    assert status == 200 and ctype.startswith("text/event-stream")
    chunks = [ChatCompletionChunk.model_validate_json(line[len("data: "):]) for line in body.decode().split("\n\n")
              if line.startswith("data: {")]
    assert len(chunks) > 5 and all(c.usage is None for c in chunks[:-1])
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    expected = (usage.prompt_tokens * Decimal("0.15") + usage.completion_tokens * Decimal("0.60")) / M
    assert llm_actual(PRICES, "gpt-4o-mini", body, ctype) == expected
    # the same stream with CRLF line ends, and with the Content-Type missing
    crlf = body.replace(b"\n", b"\r\n")
    assert llm_actual(PRICES, "gpt-4o-mini", crlf, "text/event-stream; charset=utf-8") == expected
    assert llm_actual(PRICES, "gpt-4o-mini", body, None) == expected

    # without include_usage the stream says nothing about usage: settle at the estimate
    del payload["stream_options"]
    _, plain, ctype = stub("/v1/chat/completions", payload)
    assert b"usage" not in plain
    assert llm_actual(PRICES, "gpt-4o-mini", plain, ctype) is None


def responses_stream(usage: dict[str, Any] | None, newline: str = "\n") -> bytes:
    """A Responses API event stream as OpenAI sends it (`event:` lines, then `data:`), built from
    the stub's answer and the SDK's event types."""
    _, body, _ = stub("/v1/responses", {"model": "gpt-4o-mini", "input": "Say something short."})
    final = json.loads(body)
    final["usage"] = usage
    started = {**final, "status": "in_progress", "output": [], "usage": None}
    events: list[ResponseCreatedEvent | ResponseTextDeltaEvent | ResponseCompletedEvent] = [
        ResponseCreatedEvent.model_validate({"type": "response.created", "sequence_number": 0, "response": started}),
        ResponseTextDeltaEvent.model_validate({"type": "response.output_text.delta", "sequence_number": 1,
                                               "item_id": "msg_1", "output_index": 0, "content_index": 0,
                                               "delta": "Echo: usage", "logprobs": []}),
        ResponseCompletedEvent.model_validate({"type": "response.completed", "sequence_number": 2, "response": final}),
    ]
    return "".join(f"event: {e.type}{newline}data: {e.model_dump_json()}{newline}{newline}"
                   for e in events).encode()


def test_responses_api_stream() -> None:
    usage = {"input_tokens": 40, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
             "output_tokens": 12, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 52}
    expected = (40 * Decimal("0.15") + 12 * Decimal("0.60")) / M
    assert llm_actual(PRICES, "gpt-4o-mini", responses_stream(usage), "text/event-stream") == expected
    assert llm_actual(PRICES, "gpt-4o-mini", responses_stream(usage, "\r"), "text/event-stream") == expected
    # completed without usage: nothing to read (the created event's null usage is not a usage)
    assert llm_actual(PRICES, "gpt-4o-mini", responses_stream(None), "text/event-stream") is None


def test_total_tokens_beyond_prompt_and_completion_are_priced_as_output() -> None:
    # some compatible servers leave reasoning out of completion_tokens but count it in the total
    body = chat_body({"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 150})
    assert llm_actual(PRICES, "gpt-4o-mini", body, "application/json") == \
        (100 * Decimal("0.15") + 50 * Decimal("0.60")) / M
    # a total below the parts is not believed over them
    body = chat_body({"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 5})
    assert llm_actual(PRICES, "gpt-4o-mini", body, "application/json") == \
        (100 * Decimal("0.15") + 10 * Decimal("0.60")) / M


# --- hostile answers: no usage read, nothing raised ---

@pytest.mark.parametrize("bad", [10.0, 1e3, -1, True, False, "10", None, [], {}, 2 * MAX_TOKENS, 10**30])
@pytest.mark.parametrize("where", ["prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens"])
def test_bad_counts_are_not_read(bad: Any, where: str) -> None:
    usage: dict[str, Any] = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                             "prompt_tokens_details": {"cached_tokens": 2}}
    if where == "cached_tokens":
        if bad is None:
            return  # a null cached count is "none cached"
        usage["prompt_tokens_details"]["cached_tokens"] = bad
    else:
        usage[where] = bad
    body = json.dumps({"usage": usage}).encode()
    assert llm_actual(PRICES, "gpt-4o-mini", body, "application/json") is None


@pytest.mark.parametrize("bad", [10.0, -1, True, "10", None, 10**9])
def test_bad_responses_api_counts_are_not_read(bad: Any) -> None:
    for where in ("input_tokens", "output_tokens"):
        usage = {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15, where: bad}
        assert llm_actual(PRICES, "gpt-4o-mini", json.dumps({"usage": usage}).encode(), "application/json") is None


@pytest.mark.parametrize("body", [
    b"",
    b"not json",
    b"\xff\xfe\x00garbage",
    b'{"usage": {"prompt_tokens": 10, "completion_tokens": 5, "x": "\xc3\x28"}}',  # invalid UTF-8
    b"[1, 2, 3]",
    b'{"usage": [10, 5]}',
    b'{"usage": "10 tokens"}',
    b'{"usage": null}',
    b'{"usage": {}}',
    b'{"usage": {"completion_tokens": 5}}',
    b'{"usage": {"prompt_tokens": 5, "completion_tokens": 1, "input_tokens": 5, "output_tokens": 1}}',
    b'{"usage": {"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 6}}}',
    b'{"usage": {"prompt_tokens": 5, "prompt_tokens_details": [1]}}',
    b'{"usage": {"prompt_tokens": 1' + b"0" * 5000 + b"}}",  # past Python's int digit limit
    b'{"usage": {"prompt_tokens": 1e2}}',
    b'{"usage": {"prompt_tokens": NaN}}',
    b'{"usage": {"prompt_tokens": Infinity}}',
    b'{"usage": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
    b'{"usage": ' + b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"}",
    b'{"choices": [{"message": {"content": "{\\"usage\\": {\\"prompt_tokens\\": 1}}"}}]}',  # usage in the text
])
def test_unreadable_json_answers(body: bytes) -> None:
    assert llm_actual(PRICES, "gpt-4o-mini", body, "application/json") is None
    assert llm_actual(PRICES, "gpt-4o-mini", body, None) is None


@pytest.mark.parametrize("body", [
    b"data: [DONE]\n\n",
    b"\x00\xff" * 1000,
    b"data: {\n\n",
    sse({"usage": {"prompt_tokens": 10.5, "completion_tokens": 1}}),
    sse({"usage": {"prompt_tokens": 5, "completion_tokens": 1}}, {"usage": {"prompt_tokens": -1}}, "[DONE]"),
    sse({"usage": {"prompt_tokens": 5, "completion_tokens": 1}}, {"usage": "garbage"}),
    sse({"type": "response.completed", "response": {"usage": {"input_tokens": True, "output_tokens": 1}}}),
    sse({"type": "response.output_text.delta", "delta": "usage"}),
    b"data: " + b"[" * 100_000 + b"usage" + b"\n\n",
    b'event: usage\nid: usage\n: usage {"prompt_tokens": 1}\n\n',
])
def test_unreadable_event_streams(body: bytes) -> None:
    # a later unreadable usage is not passed over for an earlier, readable one
    assert llm_actual(PRICES, "gpt-4o-mini", body, "text/event-stream") is None


def test_an_answer_of_another_type_is_not_read() -> None:
    body = chat_body({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})
    assert llm_actual(PRICES, "gpt-4o-mini", body, "text/html") is None
    assert llm_actual(PRICES, "gpt-4o-mini", None, "application/json") is None
    assert llm_actual(PRICES, "gpt-4o-mini", body, "application/problem+json") == Decimal("0.0000045")


def test_big_answers_are_read_within_bounds() -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    expected = Decimal("0.0000045")
    # 5 MB of answer text, usage at the end: read
    doc = {"choices": [{"message": {"content": "x" * 5_000_000}}], "usage": usage}
    body = json.dumps(doc).encode()
    started = time.perf_counter()
    assert llm_actual(PRICES, "gpt-4o-mini", body, "application/json") == expected
    # 5 MB of garbage, and 5 MB of small nested arrays
    assert llm_actual(PRICES, "gpt-4o-mini", b"{" + b"\x00" * 5_000_000, "application/json") is None
    assert llm_actual(PRICES, "gpt-4o-mini", b'{"usage": ' + b"[[1]]," * 1_000_000 + b"1}", "application/json") is None
    # past MAX_BODY_BYTES a JSON answer is not parsed at all: settles at the estimate
    over = json.dumps({"data": "x" * MAX_BODY_BYTES, "usage": usage}).encode()
    assert llm_actual(PRICES, "gpt-4o-mini", over, "application/json") is None
    assert time.perf_counter() - started < 5


def test_long_event_streams_are_read_from_the_tail() -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": " word"}}],
             "usage": None}
    last = b'data: {"usage": {"prompt_tokens": 1, "completion_tokens": 0}}\r\r'
    cases: list[tuple[bytes, str | None, Decimal | None]] = [
        # a 20 MB stream (every chunk says "usage": null, as OpenAI's do): the last usage is found
        (sse(chunk) * 150_000 + sse({"choices": [], "usage": usage}, "[DONE]"), "text/event-stream",
         Decimal("0.0000045")),
        # nothing but events mentioning usage: bounded work, nothing read
        (sse({"usage": None}) * 500_000, "text/event-stream", None),
        (b"data: usage\n\n" * 1_000_000, "text/event-stream", None),
        (b"data: usage" * 2_000_000, None, None),  # one 22 MB event
        (b"\n" * 20_000_000, "text/event-stream", None),
        # 20 MB of blank lines (CR line ends) before the usage event: the event is still whole in the tail
        (b"\r" * 20_000_000 + last, "text/event-stream", Decimal("0.00000015")),
    ]
    assert len(cases[0][0]) > 2 * MAX_BODY_BYTES
    for body, ctype, expected in cases:
        started = time.perf_counter()
        assert llm_actual(PRICES, "gpt-4o-mini", body, ctype) == expected
        assert time.perf_counter() - started < 1, body[:40]
