"""What an LLM call costs, for `cost: {llm: true}` budgets (docs/limits.md, "Budgets").

- `llm_model(fields)`: the request's model, from the route's typed values;
- `llm_estimate(prices, model, fields)`: what to reserve before the call: `llm_prices.estimate`,
  plus the output price of every token the call may produce (max tokens x n) when it says;
- `llm_actual(prices, model, body, content_type)`: what the call cost, from the `usage` of the
  upstream's answer (Chat Completions, Responses, Embeddings; JSON or Server-Sent Events).

Both answer None when there is nothing to price: the model has no price (`llm_estimate`:
the budget refuses the call, fail closed) or the answer carries no readable usage
(`llm_actual`: the call settles at its estimate).

Amounts are exact Decimals: 1 token at 0.15 per 1M tokens is 0.00000015, never a float.
A result is exact whenever it has at most FRACTION_DIGITS digits after the point, which it
always has when `per_tokens` is a power of ten (prices have at most 12 digits after the
point); otherwise (per_tokens 3, 1024, ...) it is rounded up at that digit, so a budget
never books less than the call cost. Results fit the ledgers' 60 digits.

The upstream's answer is read defensively: token counts must be whole numbers from 0 to
below MAX_TOKENS (no bools, floats, strings or nulls where a count belongs), the prompt's
cached tokens at most its tokens; anything else is "no readable usage". Nothing here
raises on an answer's content (bad UTF-8, deep or huge JSON, garbage events), and the work
is bounded: a JSON body over MAX_BODY_BYTES is not parsed, and of an event stream only the
last MAX_BODY_BYTES are read (the usage comes last).
"""

from __future__ import annotations

import json
import re
from decimal import Decimal, Inexact, localcontext
from typing import Any

from .budget_spec import LlmPrices, ModelPrice

MAX_TOKENS = 10**9  # more tokens than any one call uses: a count at or above it is not believed
MAX_BODY_BYTES = 8 * 1024 * 1024  # a JSON answer parsed in ~0.1 s; larger ones settle at the estimate
FRACTION_DIGITS = 24
_PRECISION = 100  # digits: every product and sum here is exact within it (counts < 1e9, prices <= 1e15)
_MAX_TOKEN_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
# events mentioning usage parsed from the end before giving up (a chat stream with include_usage has
# `"usage": null` in every chunk, but the one with the usage is the last before [DONE])
_MAX_EVENTS_PARSED = 64
# Responses API stream events whose `response` carries the final usage
_FINAL_RESPONSE_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def llm_model(fields: dict[str, Any]) -> str | None:
    """The request's model (the route's `model` value), None when it has none."""
    model = fields.get("model")
    return model if isinstance(model, str) and model else None


def _price(prices: LlmPrices, model: str | None) -> ModelPrice | None:
    # No model: only the catch-all "*" entry can price the call ("" matches no id and no other prefix).
    return prices.price_for(model or "")


def _tidy(d: Decimal) -> Decimal:
    """The same value without trailing zeros after the point (and never in exponent form for whole numbers)."""
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        return d.quantize(Decimal(1)) if d == d.to_integral_value() else d.normalize()


def _per_tokens(amount: Decimal, per_tokens: int) -> Decimal:
    """amount / per_tokens: exact when it has at most FRACTION_DIGITS digits after the point, else rounded up there."""
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        ctx.traps[Inexact] = True
        try:
            exact = amount / Decimal(per_tokens)
        except Inexact:
            exact = None
        if exact is not None:
            exponent = exact.as_tuple().exponent
            if isinstance(exponent, int) and exponent >= -FRACTION_DIGITS:
                return _tidy(exact)
    # Integers only from here: ceil(amount * 10**FRACTION_DIGITS / per_tokens), no intermediate rounding.
    _, digits, exponent = amount.as_tuple()
    assert isinstance(exponent, int)  # finite: prices and counts are checked
    coefficient = int("".join(map(str, digits)) or "0")
    shift = exponent + FRACTION_DIGITS
    numerator = coefficient * 10**shift if shift >= 0 else coefficient
    denominator = per_tokens if shift >= 0 else per_tokens * 10**-shift
    scaled = -(-numerator // denominator)
    return _tidy(Decimal(scaled).scaleb(-FRACTION_DIGITS))


def _whole(value: Any, name: str) -> int | None:
    """A typed request value that is a whole number: a Cedar Long (an int), or a Cedar decimal
    without a fractional part (a custom route may type it so). None when absent."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name}: a whole number of tokens, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        ext = value.get("__extn")
        arg = ext.get("arg") if isinstance(ext, dict) and ext.get("fn") == "decimal" else None
        if isinstance(arg, str) and re.fullmatch(r"-?[0-9]{1,20}(\.0{1,4})?", arg):
            return int(Decimal(arg))
    raise ValueError(f"{name}: a whole number expected, got {type(value).__name__}")


def llm_estimate(prices: LlmPrices, model: str | None, fields: dict[str, Any]) -> Decimal | None:
    """What to reserve for the call before it is made; None when the model has no price.

    `llm_prices.estimate`, plus when the call caps its output (max_completion_tokens,
    max_tokens or max_output_tokens; the largest given), the output price of that many
    tokens for each of its `n` answers. The reserved tokens are capped at MAX_TOKENS (more
    than any call produces; a Cedar Long's 2**63 would overflow the ledgers' 60 digits,
    and the answer's usage settles what was really used). A max-tokens or `n` value
    that is present but not a whole number of at least 1 raises ValueError (the route's
    typing admits no such value: a misdeclared route fails closed).
    """
    price = _price(prices, model)
    if price is None:
        return None
    limits = [v for v in (_whole(fields.get(name), name) for name in _MAX_TOKEN_FIELDS) if v is not None]
    if not limits:
        return prices.estimate
    n = _whole(fields.get("n"), "n")
    n = 1 if n is None else n
    if min(limits) < 1 or n < 1:
        raise ValueError("max tokens and n must be at least 1")
    tokens = min(max(limits) * n, MAX_TOKENS)
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        return _tidy(prices.estimate + _per_tokens(price.output * tokens, prices.per_tokens))


def _count(value: Any) -> int | None:
    """A token count as the answer gives it: a plain int, 0 <= n < MAX_TOKENS; None otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_TOKENS:
        return None
    return value


def _cached(usage: dict[str, Any], details_key: str) -> int | None:
    """Cached prompt tokens (0 when the answer gives no details); None when unreadable."""
    details = usage.get(details_key)
    if details is None:
        return 0
    if not isinstance(details, dict):
        return None
    cached = details.get("cached_tokens")
    return 0 if cached is None else _count(cached)


def _tokens(usage: Any) -> tuple[int, int, int] | None:
    """(uncached input, cached input, output) tokens of a `usage` object, None when unreadable.

    Chat Completions and Embeddings: prompt_tokens (+ completion_tokens; an embedding has
    none), prompt_tokens_details.cached_tokens. Responses API: input_tokens, output_tokens,
    input_tokens_details.cached_tokens. Cached tokens are part of the input tokens. When
    total_tokens counts more than input + output (some OpenAI-compatible servers leave
    reasoning tokens out of completion_tokens but not out of the total), the difference is
    priced as output: a budget books too much rather than too little.
    """
    if not isinstance(usage, dict):
        return None
    responses_shape = "input_tokens" in usage or "output_tokens" in usage
    chat_shape = "prompt_tokens" in usage or "completion_tokens" in usage
    if responses_shape == chat_shape:  # neither, or both: not one of the shapes we know
        return None
    if responses_shape:
        prompt, output = _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
        cached = _cached(usage, "input_tokens_details")
    else:
        prompt = _count(usage.get("prompt_tokens"))
        output = _count(usage["completion_tokens"]) if "completion_tokens" in usage else 0
        cached = _cached(usage, "prompt_tokens_details")
    if prompt is None or output is None or cached is None or cached > prompt:
        return None
    if "total_tokens" in usage:
        total = usage["total_tokens"]  # the sum of two counts: below 2 * MAX_TOKENS
        if isinstance(total, bool) or not isinstance(total, int) or not 0 <= total < 2 * MAX_TOKENS:
            return None
        output = max(output, total - prompt)
    return prompt - cached, cached, output


def _json(text: bytes) -> Any:
    """The parsed JSON document, None when it is not one (or too deep, or a number too long to read)."""
    try:
        return json.loads(text.decode("utf-8-sig"))
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, int digit limit
        return None


def _usage_of_json(body: bytes) -> Any:
    if len(body) > MAX_BODY_BYTES:
        return None
    doc = _json(body)
    return doc.get("usage") if isinstance(doc, dict) else None


def _usage_of_events(body: bytes) -> Any:
    """The usage of the last event that carries one: a chat.completion.chunk with `usage`
    (stream_options.include_usage; the others have `usage: null`), or a Responses API
    response.completed / incomplete / failed event's `response.usage`. A later event that
    carries an unreadable usage is not passed over for an earlier one."""
    cut = len(body) > MAX_BODY_BYTES
    if cut:
        body = body[-MAX_BODY_BYTES:]
    # Lines end in CRLF, LF or CR; an event ends at a blank line (no data line holds one).
    text = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    low = 0
    if cut:  # the tail starts inside an event: drop it (an event dropped whole is not the last one)
        low = text.find(b"\n\n")
        if low < 0:
            return None
        low += 2
    high = len(text)
    # From the end, only events that mention usage (text deltas, [DONE] are skipped by bytes.rfind,
    # not one by one), and at most _MAX_EVENTS_PARSED of them.
    for _ in range(_MAX_EVENTS_PARSED):
        hit = text.rfind(b"usage", low, high)
        if hit < 0:
            return None
        start = text.rfind(b"\n\n", low, hit)
        start = low if start < 0 else start + 2
        end = text.find(b"\n\n", hit)
        event = text[start:len(text) if end < 0 else end]
        high = start
        data = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
        doc = _json(b"\n".join(data)) if data else None
        if not isinstance(doc, dict):
            continue
        if doc.get("type") in _FINAL_RESPONSE_EVENTS and isinstance(doc.get("response"), dict):
            usage = doc["response"].get("usage")
        else:
            usage = doc.get("usage")
        if usage is not None:
            return usage  # the last one (servers that send a running total end with the whole)
    return None


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def llm_actual(prices: LlmPrices, model: str | None, body: bytes | None, content_type: str | None) -> Decimal | None:
    """What the call cost by the `usage` of its answer, priced for the request's `model`.

    `body` is the answer as received (decoded from any Content-Encoding), `content_type`
    its Content-Type: JSON (application/json, ...+json) or text/event-stream; without one,
    a body starting with `{` is read as JSON and anything else as events. None when the
    model has no price or the answer has no readable usage: the caller settles at the estimate.
    """
    price = _price(prices, model)
    if price is None or not body:
        return None
    media = _media_type(content_type)
    if media == "text/event-stream":
        usage = _usage_of_events(body)
    elif media.endswith("json") or (not media and re.match(rb"\s*\{", body)):
        usage = _usage_of_json(body)
    elif not media:
        usage = _usage_of_events(body)
    else:
        return None
    tokens = _tokens(usage)
    if tokens is None:
        return None
    uncached, cached, output = tokens
    cached_price = price.input if price.cached_input is None else price.cached_input
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        amount = uncached * price.input + cached * cached_price + output * price.output
    return _per_tokens(amount, prices.per_tokens)
