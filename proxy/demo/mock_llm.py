"""A small OpenAI-compatible API, for the demo and tests: deterministic answers, real `usage`.

    python -m proxy.demo.mock_llm --port 9104 [--api-key KEY]

- `POST /v1/chat/completions`: the answer repeats the last user message
  (`Echo: ...`), cut to `max_completion_tokens` / `max_tokens` (then
  `finish_reason: length`), `n` choices; `stream: true` answers Server-Sent Events
  (`chat.completion.chunk`s, a word at a time, then `data: [DONE]`), with a last
  chunk carrying `usage` (and `choices: []`) when `stream_options.include_usage`.
- `POST /v1/responses`: the same answer as a Responses API `response`
  (`output[0]` a message with one `output_text`), `usage` in input/output tokens.
  Streaming is not offered (400).
- `POST /v1/embeddings`: one vector per input (8 floats, or `dimensions`), derived
  from the text's SHA-256; `encoding_format` `float` or `base64` (little-endian
  float32, what the OpenAI SDK asks for by default).
- `GET /v1/models`, `GET /v1/models/{model}`.

Tokens are counted deterministically: words and punctuation marks of the text
(plus 3 per chat message and 3 for the reply, as OpenAI counts chat overhead).
Every request needs `Authorization: Bearer <key>` (default `MOCK_LLM_API_KEY` or
`sk-mock-llm-upstream-key`): the upstream key Proctor injects, never an agent's
token. Errors are OpenAI error objects (`{"error": {message, type, param, code}}`).
Every request is kept in `app[SEEN]` (method, path, Authorization, JSON body) so
tests can check what Proctor forwarded.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import os
import re
import struct
import time
from typing import Any

from aiohttp import web

DEFAULT_KEY = "sk-mock-llm-upstream-key"
SEEN: web.AppKey[list[dict[str, Any]]] = web.AppKey("seen", list)
MODELS = ("gpt-4o-mini", "gpt-4o", "o1-pro", "text-embedding-3-small")
EMBEDDING_MODELS = ("text-embedding-3-small",)
CREATED = 1_700_000_000  # the models' fixed creation time
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    return len(_TOKEN_RE.findall(text))


def _error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
           param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": type_, "param": param, "code": code}},
                             status=status)


def _text_of(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content
                        if isinstance(p, dict) and p.get("type") in ("text", "input_text", "output_text"))
    return ""


def _answer(text: str, limit: int | None) -> tuple[str, bool]:
    """The reply to `text`, cut to `limit` tokens; (reply, cut)."""
    words = ("Echo: " + " ".join(text.split())).split(" ")
    reply: list[str] = []
    for word in words:
        if limit is not None and count_tokens(" ".join([*reply, word])) > limit:
            return " ".join(reply), True
        reply.append(word)
    return " ".join(reply), False


def _limit(body: dict, *names: str) -> int | None | web.Response:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return _error(400, f"Invalid '{name}': expected an integer of at least 1.", param=name,
                          code="invalid_value")
        return value
    return None


def _vector(text: str, dims: int) -> list[float]:
    digest = b""
    counter = 0
    while len(digest) < dims * 2:
        digest += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    raw = [int.from_bytes(digest[i * 2:i * 2 + 2], "big") / 65535 * 2 - 1 for i in range(dims)]
    norm = sum(v * v for v in raw) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in raw]


def build_app(api_key: str | None = None) -> web.Application:
    key = api_key or os.environ.get("MOCK_LLM_API_KEY") or DEFAULT_KEY
    ids = itertools.count(1)

    @web.middleware
    async def authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
        body: Any = None
        if request.can_read_body:
            try:
                body = json.loads(await request.read())
            except ValueError:
                body = None
        request.app[SEEN].append({"method": request.method, "path": request.path,
                                  "authorization": request.headers.get("Authorization"), "body": body})
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return _error(401, "You didn't provide an API key. You need to provide your API key in an "
                          "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                          code="missing_api_key")
        if auth[len("Bearer "):] != key:
            return _error(401, "Incorrect API key provided.", code="invalid_api_key")
        return await handler(request)

    async def json_body(request: web.Request) -> dict | web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.")
        return body

    def model_of(body: dict, allowed: tuple[str, ...] = MODELS) -> str | web.Response:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return _error(400, "you must provide a model parameter", param="model", code="missing_required_parameter")
        if model not in allowed:
            return _error(404, f"The model `{model}` does not exist or you do not have access to it.",
                          code="model_not_found")
        return model

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        if isinstance(body, web.Response):
            return body
        model = model_of(body)
        if isinstance(model, web.Response):
            return model
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return _error(400, "'messages' must be a non-empty array of message objects.", param="messages")
        limit = _limit(body, "max_completion_tokens", "max_tokens")
        if isinstance(limit, web.Response):
            return limit
        n = body.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 128:
            return _error(400, "Invalid 'n': expected an integer from 1 to 128.", param="n", code="invalid_value")
        prompt_tokens = 3 + sum(3 + count_tokens(_text_of(m.get("content"))) for m in messages)
        last_user = next((_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        reply, cut = _answer(last_user, limit)
        finish = "length" if cut else "stop"
        completion_tokens = count_tokens(reply) * n
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        }
        cid, created = f"chatcmpl-mock{next(ids):08d}", int(time.time())
        if not body.get("stream"):
            return web.json_response({
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": reply, "refusal": None},
                             "logprobs": None, "finish_reason": finish} for i in range(n)],
                "usage": usage, "system_fingerprint": "fp_mock",
            })
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        async def send(choices: list[dict], with_usage: Any = None) -> None:
            chunk: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                     "system_fingerprint": "fp_mock", "choices": choices}
            if include_usage:
                chunk["usage"] = with_usage
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())

        for i in range(n):
            await send([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}])
            for j, word in enumerate(reply.split(" ") if reply else []):
                await send([{"index": i, "delta": {"content": word if j == 0 else " " + word}, "logprobs": None,
                             "finish_reason": None}])
            await send([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}])
        if include_usage:
            await send([], usage)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def responses(request: web.Request) -> web.Response:
        body = await json_body(request)
        if isinstance(body, web.Response):
            return body
        model = model_of(body)
        if isinstance(model, web.Response):
            return model
        if body.get("stream"):
            return _error(400, "This mock does not stream the Responses API.", param="stream",
                          code="unsupported_value")
        limit = _limit(body, "max_output_tokens")
        if isinstance(limit, web.Response):
            return limit
        raw = body.get("input")
        if isinstance(raw, str):
            items: list[Any] = [{"role": "user", "content": raw}]
        elif isinstance(raw, list) and raw:
            items = raw
        else:
            return _error(400, "'input' must be a string or a non-empty array of input items.", param="input")
        instructions = body.get("instructions")
        texts = [_text_of(i.get("content")) if isinstance(i, dict) else "" for i in items]
        input_tokens = sum(3 + count_tokens(t) for t in texts) + (
            3 + count_tokens(instructions) if isinstance(instructions, str) else 0)
        last_user = next((_text_of(i.get("content")) for i in reversed(items)
                          if isinstance(i, dict) and i.get("role", "user") == "user"), "")
        reply, cut = _answer(last_user, limit)
        output_tokens = count_tokens(reply)
        n = next(ids)
        return web.json_response({
            "id": f"resp_mock{n:08d}", "object": "response", "created_at": int(time.time()),
            "status": "incomplete" if cut else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "error": None, "model": model, "instructions": instructions if isinstance(instructions, str) else None,
            "max_output_tokens": limit,
            "output": [{"type": "message", "id": f"msg_mock{n:08d}", "status": "incomplete" if cut else "completed",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": reply, "annotations": []}]}],
            "parallel_tool_calls": True, "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
            "store": False, "temperature": body.get("temperature", 1.0), "text": {"format": {"type": "text"}},
            "tool_choice": "auto", "tools": [], "top_p": 1.0, "truncation": "disabled",
            "usage": {"input_tokens": input_tokens,
                      "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                      "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": input_tokens + output_tokens},
            "user": None, "metadata": {},
        })

    async def embeddings(request: web.Request) -> web.Response:
        body = await json_body(request)
        if isinstance(body, web.Response):
            return body
        model = model_of(body, EMBEDDING_MODELS)
        if isinstance(model, web.Response):
            return model
        raw = body.get("input")
        inputs: Any = [raw] if isinstance(raw, str) or (isinstance(raw, list) and raw and
                                                          all(isinstance(t, int) for t in raw)) else raw
        if not isinstance(inputs, list) or not inputs or not all(
                isinstance(t, str) or (isinstance(t, list) and all(isinstance(x, int) for x in t)) for t in inputs):
            return _error(400, "'input' must be a string, an array of strings or an array of token arrays.",
                          param="input")
        dims = body.get("dimensions", 8)
        if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= 3072:
            return _error(400, "Invalid 'dimensions': expected an integer from 1 to 3072.", param="dimensions")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            return _error(400, "Invalid 'encoding_format': expected 'float' or 'base64'.", param="encoding_format")
        data, tokens = [], 0
        for i, item in enumerate(inputs):
            text = item if isinstance(item, str) else " ".join(map(str, item))
            tokens += count_tokens(text) if isinstance(item, str) else len(item)
            vec = _vector(text, dims)
            encoded: Any = vec if fmt == "float" else base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        return web.json_response({"object": "list", "data": data, "model": model,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def model_entry(model: str) -> dict:
        return {"id": model, "object": "model", "created": CREATED, "owned_by": "proctor-mock"}

    async def list_models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [model_entry(m) for m in MODELS]})

    async def get_model(request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if model not in MODELS:
            return _error(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
        return web.json_response(model_entry(model))

    async def not_found(request: web.Request) -> web.Response:
        return _error(404, f"Invalid URL ({request.method} {request.path})")

    app = web.Application(middlewares=[authenticate])
    app[SEEN] = []
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9104)
    ap.add_argument("--api-key", default=None, help=f"the upstream key it accepts (default: $MOCK_LLM_API_KEY or {DEFAULT_KEY})")
    args = ap.parse_args()
    web.run_app(build_app(args.api_key), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
