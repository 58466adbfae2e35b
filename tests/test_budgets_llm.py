"""LLM spend budgets (docs/limits.md, "LLM spend") with the official OpenAI Python SDK.

A real `proctor run` with the bundled LLM connector (connectors/llm.yaml: chat
completions, responses and embeddings declare `cost: {llm: true}`), `llm_prices` and a
budget per agent over the connector, in front of the OpenAI-compatible stub
(proxy/demo/mock_llm.py). Agents use the SDK in forward mode (the stub's URL through
Proctor as the HTTP proxy) and in gateway mode (Proctor's base URL, the agent's JWT as
the API key) on both gateway engines.

What it shows: each call reserves its estimate (llm_prices.estimate plus the output price
of its max tokens) and settles at the exact token price of the answer's `usage` (JSON
answers, and a streamed chat's usage chunk), which the ledger then counts; a streamed
answer without usage settles at its estimate; the SDK's streaming iteration works on a
budgeted (buffered) stream; a call that no longer fits is refused 429 before the provider
sees it and the SDK raises RateLimitError carrying the budget's name, what was spent and
Retry-After (and does not retry: the wait is over the SDK's two minutes); an unpriced
model is a BadRequestError naming it; the model list costs nothing; a budget over the
connector without llm_prices does not start.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from conftest import GATEWAY_ENGINES, Proctor, start_proctor, wait_for
from proxy.config import default_config
from proxy.connectors.manifest import load_manifests
from proxy.limits.budget_table import BudgetConfigError, build_budget_table
from proxy.limits.budget_spec import BudgetSpec, LlmPrices
from test_llm_connector import PROVIDER_KEY, Stub

ROOT = Path(__file__).resolve().parent.parent
DECISION_HEADER = "X-Proctor-Decision-Id"
PER_TOKENS = 1000
# USD per 1,000 tokens: chosen so a handful of the stub's small calls fit in LIMIT
PRICES: dict[str, dict[str, str]] = {
    "gpt-4o-mini": {"input": "0.005", "output": "0.015"},
    "gpt-4o": {"input": "0.01", "output": "0.04"},
    "text-embedding-3-small": {"input": "0.002", "output": "0"},
}
ESTIMATE = Decimal("0.0001")  # reserved for a call that names no max tokens
LIMIT = Decimal("0.001")
BUDGET = "llm-spend"
LLM_PRICES = {"currency": "USD", "per_tokens": PER_TOKENS, "estimate": str(ESTIMATE), "models": PRICES}
SPEND_BUDGET = {"name": BUDGET, "match": {"connectors": ["llm"]}, "key": ["agent"], "limit": str(LIMIT),
                "currency": "USD", "period": "month"}
integration = pytest.mark.integration


def price(model: str, kind: str) -> Decimal:
    return Decimal(PRICES[model][kind])


def cost(model: str, input_tokens: int, output_tokens: int = 0) -> Decimal:
    """What the budget should book for a call: every token at its model's price, exactly."""
    return (input_tokens * price(model, "input") + output_tokens * price(model, "output")) / PER_TOKENS


def hello(text: str) -> list[dict]:
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]


# ------------------------------------------------------------------ the declarations (no proxy)


def test_the_bundled_connector_costs_tokens_only_where_a_budget_asks() -> None:
    manifests = load_manifests(default_config().connectors_dir)
    costs = {f"{r.method} {r.path}": r.cost for m in manifests if m.name == "llm" for r in m.routes}
    assert {route for route, c in costs.items() if c is not None and c.llm} == {
        "POST /v1/chat/completions", "POST /v1/responses", "POST /v1/embeddings"}
    free = [costs["GET /v1/models"], costs["GET /v1/models/{model}"]]
    assert [c.static if c is not None else None for c in free] == [0, 0]
    # the embedded default declares no budget: nothing is priced or reserved
    assert not build_budget_table(default_config().budgets, manifests)
    spec = BudgetSpec.model_validate(SPEND_BUDGET)
    with pytest.raises(BudgetConfigError) as e:
        build_budget_table([spec], manifests)
    assert "route llm POST /v1/chat/completions costs LLM tokens, which needs llm_prices" in str(e.value)
    table = build_budget_table([spec], manifests, llm_prices=LlmPrices.model_validate(LLM_PRICES))
    charges = table.for_request("llm", "POST /v1/embeddings", "llm.embedding.create", "POST")
    assert [(c.budget.name, c.cost.kind) for c in charges] == [(BUDGET, "llm")]
    (listing,) = table.for_request("llm", "GET /v1/models", "llm.model.list", "GET")
    assert listing.cost.static == 0  # not the 1-per-call default of a route without a cost


# ------------------------------------------------------------------ through a real proxy


class LlmProxy:
    """A proctor with the bundled LLM connector (pointed at the stub), llm_prices and the budget."""

    def __init__(self, p: Proctor, stub: Stub, idp: Any, engine: str) -> None:
        self.p, self.stub, self.idp, self.engine = p, stub, idp, engine

    def agent(self, prefix: str) -> tuple[str, str]:
        """A new agent of llm-users (its own budget ledger) and its token."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        return name, self.idp.token(name, groups=["llm-users"], ttl=600)

    def forward_client(self, agent: str, token: str, **kw: Any) -> openai.OpenAI:
        http = httpx.Client(proxy=self.p.proxy_url_with(agent, token), trust_env=False, timeout=30)
        return openai.OpenAI(base_url=self.stub.base_url, api_key="sk-agent-side", http_client=http, **kw)

    def gateway_client(self, token: str, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.p.gateway_url}/openai/v1", api_key=token,
                             http_client=httpx.Client(trust_env=False, timeout=30), **kw)

    def budget(self, decision_id: str) -> dict:
        """The decision record's budget part, once the call is recorded (after its settlement)."""
        wait_for(lambda: any(d.get("decision_id") == decision_id and "type" not in d for d in self.p.decisions()),
                 timeout=10, what="decision record")
        rec = self.p.decision(decision_id)
        assert rec["budget"]["name"] == BUDGET, rec
        return rec["budget"]


def start_llm_proxy(base: Path, idp: Any, pki: Any, upstream: Any, upstream_tls: Any, stub: Stub,
                    engine: str = "mitmproxy", **overrides: Any) -> Proctor:
    pol = base / "policies-src"
    pol.mkdir(parents=True)
    for name in ("schema.cedarschema", "llm.cedar"):
        (pol / name).write_text((ROOT / "policies" / name).read_text())
    llm = yaml.safe_load((ROOT / "connectors" / "llm.yaml").read_text().replace(":9104", f":{stub.port}"))
    cfg = {"budgets": [SPEND_BUDGET], "llm_prices": LLM_PRICES,
           "gateway": {"engine": engine, "routes": [{"prefix": "/openai", "upstream": f"http://127.0.0.1:{stub.port}"}]},
           **overrides}
    return start_proctor(base / "p", idp, pki, upstream, upstream_tls, cfg, policies_src=pol, extra_connectors=[llm],
                         env={"OPENAI_API_KEY": PROVIDER_KEY})


@pytest.fixture(scope="module")
def stub():
    s = Stub()
    yield s
    s.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory, idp, pki, upstream, upstream_tls, stub):
    p = start_llm_proxy(tmp_path_factory.mktemp("llm-budget"), idp, pki, upstream, upstream_tls, stub)
    yield LlmProxy(p, stub, idp, "mitmproxy")
    p.stop()


@pytest.fixture(scope="module", params=GATEWAY_ENGINES)
def gw(request, tmp_path_factory, idp, pki, upstream, upstream_tls, stub):
    """The gateway listener, served by each engine."""
    if request.param == "mitmproxy":
        yield request.getfixturevalue("env")
        return
    p = start_llm_proxy(tmp_path_factory.mktemp(f"llm-budget-{request.param}"), idp, pki, upstream, upstream_tls,
                        stub, engine=request.param)
    yield LlmProxy(p, stub, idp, request.param)
    p.stop()


@integration
def test_each_call_settles_at_its_token_price_and_the_ledger_counts_it(env, stub):
    agent, token = env.agent("spender")
    client = env.forward_client(agent, token, max_retries=0)

    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=hello("What is Proctor?"))
    usage = raw.parse().usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (17, 6)  # the stub's count
    chat = env.budget(raw.headers[DECISION_HEADER])
    # reserved the flat estimate (no max tokens), settled at 17 x 0.005 + 6 x 0.015 per 1,000 tokens
    assert (chat["estimate"], chat["actual"], chat["actual_source"]) == ("0.0001", "0.000175", "llm")
    assert (chat["outcome"], chat["result"], chat["spent"]) == ("reserved", "settled", "0")
    spent = Decimal(chat["actual"])

    raw = client.responses.with_raw_response.create(model="gpt-4o", input="Summarise the week",
                                                    instructions="Be brief.", max_output_tokens=16)
    usage = raw.parse().usage
    response = env.budget(raw.headers[DECISION_HEADER])
    # reserved the estimate plus the output price of 16 tokens; settled at what was used
    assert Decimal(response["estimate"]) == ESTIMATE + 16 * price("gpt-4o", "output") / PER_TOKENS
    assert Decimal(response["actual"]) == cost("gpt-4o", usage.input_tokens, usage.output_tokens) == \
        Decimal("0.00032") and response["actual_source"] == "llm"
    assert Decimal(response["spent"]) == spent  # the ledger had the chat's actual cost, not its estimate
    spent += Decimal(response["actual"])

    raw = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["alpha", "beta gamma"])
    embedding = env.budget(raw.headers[DECISION_HEADER])
    assert Decimal(embedding["actual"]) == cost("text-embedding-3-small", raw.parse().usage.prompt_tokens) == \
        Decimal("0.000006") and embedding["actual_source"] == "llm"
    assert Decimal(embedding["spent"]) == spent
    spent += Decimal(embedding["actual"])

    # the model list is free: counted at 0 in the same budget, nothing reserved past it
    raw = client.models.with_raw_response.list()
    assert "gpt-4o" in [m.id for m in raw.parse()]
    listing = env.budget(raw.headers[DECISION_HEADER])
    assert (listing["actual"], listing["actual_source"], Decimal(listing["spent"])) == ("0", "estimate", spent)

    # a call whose reservation no longer fits is refused before the provider sees it
    before = len(stub.seen)
    with pytest.raises(openai.RateLimitError) as err:
        client.responses.create(model="gpt-4o", input="A long essay, please", max_output_tokens=1000)
    e = err.value
    assert (e.status_code, e.code, e.type) == (429, "budget-exhausted", "rate_limit_error")
    assert len(stub.seen) == before
    proctor = e.body["proctor"]
    assert proctor["reasons"] == [f"budget:{BUDGET}"]
    b = proctor["budget"]
    assert (b["name"], b["currency"], b["limit"], Decimal(b["spent"]), b["reserved"]) == (
        BUDGET, "USD", "0.001", spent, "0")
    assert Decimal(b["estimated_cost"]) == ESTIMATE + 1000 * price("gpt-4o", "output") / PER_TOKENS
    assert b["key"] == {"agent": agent}
    message = e.body["message"]  # what the SDK shows (str(e) carries it too)
    assert message.startswith("Budget exhausted: ") and f"budget '{BUDGET}'" in message and message in str(e)
    assert f"{b['spent']} USD spent" in message and "a smaller call may still fit" in message
    assert int(e.response.headers["retry-after"]) == b["retry_after"] > 0
    refused = env.budget(e.response.headers[DECISION_HEADER])
    assert refused["outcome"] == "exhausted" and "result" not in refused

    # ... while a smaller one still fits; another agent has its own ledger
    assert client.chat.completions.create(model="gpt-4o-mini", messages=hello("hi")).choices
    other, other_token = env.agent("other")
    raw = env.forward_client(other, other_token).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=hello("hi"))
    assert env.budget(raw.headers[DECISION_HEADER])["spent"] == "0"


@integration
def test_a_budgeted_stream_is_iterated_by_the_sdk_and_settled_from_its_usage_chunk(gw, stub):
    agent, token = gw.agent("streamer")
    spent = Decimal(0)
    for client in (gw.gateway_client(token, max_retries=0), gw.forward_client(agent, token, max_retries=0)):
        with_usage = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=hello("stream these four words"), stream=True,
            stream_options={"include_usage": True})
        chunks = list(with_usage.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Echo: stream these four words"
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 5  # a word per chunk
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and usage is not None
        settled = gw.budget(with_usage.headers[DECISION_HEADER])
        assert Decimal(settled["actual"]) == cost("gpt-4o-mini", usage.prompt_tokens, usage.completion_tokens)
        assert (settled["actual_source"], settled["result"], Decimal(settled["spent"])) == ("llm", "settled", spent)
        spent += Decimal(settled["actual"])

    # without include_usage the stream says nothing of its tokens: the call settles at its estimate
    plain = gw.gateway_client(token, max_retries=0).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=hello("no usage here"), stream=True, max_tokens=20)
    chunks = list(plain.parse())
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Echo: no usage here"
    estimated = gw.budget(plain.headers[DECISION_HEADER])
    assert Decimal(estimated["estimate"]) == ESTIMATE + 20 * price("gpt-4o-mini", "output") / PER_TOKENS
    assert (estimated["actual"], estimated["actual_source"]) == (estimated["estimate"], "estimate")
    assert Decimal(estimated["spent"]) == spent


@integration
def test_an_exhausted_budget_is_a_rate_limit_error_the_sdk_does_not_retry(gw, stub):
    agent, token = gw.agent("exhauster")
    client = gw.gateway_client(token)  # the SDK's default retries (2)
    spent, calls = Decimal(0), 0
    while True:
        try:
            raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini",
                                                                   messages=hello("What is Proctor?"))
        except openai.RateLimitError as err:
            e = err
            break
        calls += 1
        assert calls < 10, "the budget never ran out"
        spent += Decimal(gw.budget(raw.headers[DECISION_HEADER])["actual"])
    # every settled call cost 0.000175; the last one reserved 0.0001 and settled over it, past the limit
    assert calls == 6 and spent == 6 * Decimal("0.000175") > LIMIT
    proctor = e.body["proctor"]
    assert Decimal(proctor["budget"]["spent"]) == spent and proctor["budget"]["key"] == {"agent": agent}
    assert "Budget exhausted" in str(e) and f"budget '{BUDGET}'" in str(e) and proctor["decision_id"] in str(e)
    retry_after = int(e.response.headers["retry-after"])
    assert retry_after == proctor["budget"]["retry_after"]
    if retry_after > 120:  # (the month renews in more than two minutes: the SDK gives up at once)
        gw.budget(proctor["decision_id"])  # (recorded: so are the attempts before it)
        refusals = [d for d in gw.p.decisions() if d.get("agent") == agent and d.get("status") == 429]
        assert len(refusals) == 1


@integration
def test_an_unpriced_model_is_a_bad_request_naming_it(gw, stub):
    agent, token = gw.agent("unpriced")
    before = len(stub.seen)
    for client in (gw.gateway_client(token, max_retries=0), gw.forward_client(agent, token, max_retries=0)):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="gpt-3.5-turbo", messages=hello("hi"))
        e = err.value
        assert (e.status_code, e.code, e.type) == (400, "request", "invalid_request_error")
        message = e.body["message"]
        assert message.startswith("Cost unknown: ") and message in str(e)
        assert "model 'gpt-3.5-turbo' has no price in llm_prices" in message and f"budget '{BUDGET}'" in message
        assert e.body["proctor"]["reasons"] == [f"budget:{BUDGET}"]
        with pytest.raises(openai.BadRequestError, match="'text-embedding-3-large' has no price"):
            client.embeddings.create(model="text-embedding-3-large", input="x")
    assert len(stub.seen) == before


@integration
def test_a_budget_over_llm_routes_without_llm_prices_does_not_start(tmp_path, idp, pki, upstream, upstream_tls,
                                                                    stub):
    with pytest.raises(RuntimeError) as e:
        start_llm_proxy(tmp_path, idp, pki, upstream, upstream_tls, stub, llm_prices=None)
    assert "costs LLM tokens, which needs llm_prices (the token price table) in proctor.yaml" in str(e.value)
