"""Budget declarations: the `budgets:` and `llm_prices:` sections of proctor.yaml and a
route's `cost:` in a connector manifest (docs/limits.md, "Budgets").

    budgets:
      - name: po-spend-monthly          # unique among budgets and rate limits' names
        match: {connectors: [erp], actions: [erp.purchase_order.create]}
        key: [group]                    # one ledger per agent group (default [agent]); same dimensions as rate limits
        limit: 50000                    # amount per window (a decimal: "50000.00")
        currency: EUR                   # a label shown with amounts
        period: month                   # calendar window: day, week, month (or minute, hour, year)
        timezone: Europe/Berlin         # the window's wall clock (default UTC)
        cost: {field: net_amount}       # what one call costs; default: the route's `cost:`, else 1 per call
        soft_threshold: 0.8             # notify when spend + reserved reaches 80 % (a fraction, optional)
        on_exceed: refuse               # refuse: 429 budget-exhausted; hold: a person approves an extension
        shadow: false                   # true: reserve and record, never refuse or hold
        on_unavailable: closed          # the ledger unreachable: 503 (closed) or let through (open)

A cost is one of:

    cost: {static: "0.50"}                  # a fixed amount per call
    cost: {field: net_amount}               # a typed numeric value of the request (body field, param or query)
    cost: {response: usage.total_cost,      # the number at this dot path of the (JSON) answer: the actual cost,
           estimate: "2.00"}                #   reserved as `estimate` (static, or {field: ...}) until it arrives
    cost: {llm: true}                       # LLM token usage of the answer priced with `llm_prices:`

    llm_prices:
      currency: USD
      per_tokens: 1000000                   # prices are per this many tokens
      models:                               # exact model ids, or a prefix ending in * ("gpt-4o*", "*")
        gpt-4o-mini: {input: "0.15", output: "0.60"}
        "*":         {input: "5.00", output: "15.00"}
      estimate: "0.05"                      # reserved per call until its usage arrives (when max tokens are unknown)

Kept apart from config.py and the manifest module so both share one definition.
"""

from __future__ import annotations

import decimal
import re
from decimal import Decimal
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator)

from .spec import NAME_RE, RateLimitMatch, check_key_dimensions
from .windows import check_period, zone

BUDGET_PERIODS = ("minute", "hour", "day", "week", "month", "year")
MAX_AMOUNT = Decimal("1e15")
MAX_FRACTION_DIGITS = 12
_DOT_PATH = re.compile(r"^[A-Za-z0-9_$-]{1,64}(\.[A-Za-z0-9_$-]{1,64}){0,15}$")
_FIELD_NAME = re.compile(r"^[A-Za-z0-9_$.@-]{1,128}$")
_MODEL_PATTERN = re.compile(r"^[A-Za-z0-9._:/@+-]{0,199}\*?$")


def parse_amount(value: Any, what: str = "amount", *, allow_zero: bool = True) -> Decimal:
    """A non-negative decimal amount from a string or an int (floats are refused: 0.1 is not exact)."""
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError(f"{what}: write it as a string (\"0.10\") or a whole number; floats are not exact")
    if isinstance(value, Decimal):
        d = value
    elif isinstance(value, int):
        d = Decimal(value)
    elif isinstance(value, str):
        try:
            d = Decimal(value.strip())
        except decimal.InvalidOperation:
            raise ValueError(f"{what}: {value!r} is not a decimal number") from None
    else:
        raise ValueError(f"{what}: a decimal number (\"12.50\") or a whole number")
    if not d.is_finite() or d < 0 or (d == 0 and not allow_zero) or d > MAX_AMOUNT:
        raise ValueError(f"{what}: {value!r} must be {'more than' if not allow_zero else 'at least'} 0 "
                         f"and at most {MAX_AMOUNT:f}")
    exp = d.as_tuple().exponent
    if isinstance(exp, int) and -exp > MAX_FRACTION_DIGITS:
        raise ValueError(f"{what}: {value!r} has more than {MAX_FRACTION_DIGITS} digits after the point")
    return d


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldCost(_Strict):
    """A typed numeric value of the request: a body field, a path param or a query param (by name)."""

    field: str

    @field_validator("field")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _FIELD_NAME.match(v):
            raise ValueError(f"field {v!r}: the name of one of the route's typed values")
        return v


class CostSpec(_Strict):
    """What one call costs (exactly one of static, field, response, llm)."""

    static: Decimal | None = None
    field: str | None = None
    response: str | None = None  # dot path into the JSON answer: the actual cost
    estimate: Decimal | FieldCost | None = None  # reserved until the response's cost is known
    llm: StrictBool = False
    scale: Decimal | None = None  # multiply a field's or the response's value (e.g. cents -> units: "0.01")

    @field_validator("static", "scale", mode="before")
    @classmethod
    def _amount(cls, v: Any) -> Any:
        return None if v is None else parse_amount(v, "cost")

    @field_validator("estimate", mode="before")
    @classmethod
    def _estimate(cls, v: Any) -> Any:
        if v is None or isinstance(v, dict):
            return v
        return parse_amount(v, "cost.estimate")

    @field_validator("field")
    @classmethod
    def _field(cls, v: str | None) -> str | None:
        if v is not None and not _FIELD_NAME.match(v):
            raise ValueError(f"cost.field {v!r}: the name of one of the route's typed values")
        return v

    @field_validator("response")
    @classmethod
    def _response(cls, v: str | None) -> str | None:
        if v is not None and not _DOT_PATH.match(v):
            raise ValueError(f"cost.response {v!r}: a dot path into the JSON answer, such as usage.total_cost")
        return v

    @model_validator(mode="after")
    def _one(self) -> "CostSpec":
        kinds = [k for k, on in (("static", self.static is not None), ("field", self.field is not None),
                                 ("response", self.response is not None), ("llm", self.llm)) if on]
        if len(kinds) != 1:
            raise ValueError("cost: give exactly one of static, field, response or llm "
                             f"(got {', '.join(kinds) or 'none'})")
        if self.estimate is not None and kinds[0] in ("static", "field"):
            raise ValueError("cost.estimate is for costs known from the response (response, llm)")
        if self.scale is not None and kinds[0] not in ("field", "response"):
            raise ValueError("cost.scale multiplies a field's or the response's value")
        if self.response is not None and self.estimate is None:
            raise ValueError("cost.response needs an estimate: what to reserve until the answer says the cost")
        return self

    @property
    def kind(self) -> Literal["static", "field", "response", "llm"]:
        if self.static is not None:
            return "static"
        if self.field is not None:
            return "field"
        if self.response is not None:
            return "response"
        return "llm"

    @property
    def fields(self) -> set[str]:
        """The request values this cost reads (checked against the route)."""
        out = {self.field} if self.field else set()
        if isinstance(self.estimate, FieldCost):
            out.add(self.estimate.field)
        return out


class BudgetSpec(_Strict):
    """A `budgets:` entry of proctor.yaml."""

    name: str
    match: RateLimitMatch = Field(default_factory=RateLimitMatch)
    key: list[str] = Field(default_factory=lambda: ["agent"])
    limit: Decimal
    currency: str = Field("", max_length=16)
    period: str = "month"
    timezone: str = "UTC"
    cost: CostSpec | None = None  # None: the route's `cost:`, else 1 per call
    soft_threshold: Decimal | None = None  # a fraction of the limit, 0 < t < 1
    on_exceed: Literal["refuse", "hold"] = "refuse"
    shadow: StrictBool = False
    on_unavailable: Literal["closed", "open"] = "closed"
    # how long a reservation holds without a response before it lapses (the call hung, the process died)
    reservation_ttl_seconds: StrictInt = Field(300, ge=5, le=86400)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"budget name {v!r}: 1 to 64 letters, digits and _ . - (starting with a letter or digit)")
        return v

    @field_validator("key")
    @classmethod
    def _key(cls, v: list[str]) -> list[str]:
        return check_key_dimensions(v)

    @field_validator("limit", mode="before")
    @classmethod
    def _limit(cls, v: Any) -> Decimal:
        return parse_amount(v, "limit", allow_zero=False)

    @field_validator("soft_threshold", mode="before")
    @classmethod
    def _soft(cls, v: Any) -> Decimal | None:
        if v is None:
            return None
        if isinstance(v, float):  # (a fraction like 0.8 is written as a number in YAML; exact enough as text)
            v = repr(v)
        d = parse_amount(v, "soft_threshold", allow_zero=False)
        if not d < 1:
            raise ValueError("soft_threshold is a fraction of the limit between 0 and 1 (0.8 = 80 %)")
        return d

    @field_validator("period")
    @classmethod
    def _period(cls, v: str) -> str:
        try:
            return check_period(v)
        except ValueError:
            raise ValueError(f"period {v!r}: one of {', '.join(BUDGET_PERIODS)} (a calendar window)") from None

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        zone(v)  # ValueError names the zone
        return v

    @field_validator("currency")
    @classmethod
    def _currency(cls, v: str) -> str:
        if v and not re.fullmatch(r"[A-Za-z0-9$€£¥._-]{1,16}", v):
            raise ValueError(f"currency {v!r}: a short label such as EUR, USD or tokens")
        return v


class ModelPrice(_Strict):
    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None  # prompt tokens served from the provider's cache (default: input)

    @field_validator("input", "output", "cached_input", mode="before")
    @classmethod
    def _amount(cls, v: Any) -> Any:
        return None if v is None else parse_amount(v, "price")


class LlmPrices(_Strict):
    """Token prices for `cost: {llm: true}` budgets."""

    currency: str = Field("USD", max_length=16)
    per_tokens: StrictInt = Field(1_000_000, ge=1, le=1_000_000_000)
    models: dict[str, ModelPrice] = Field(default_factory=dict)
    estimate: Decimal = Decimal("0.05")  # reserved per call when the call's max tokens are not given

    @field_validator("estimate", mode="before")
    @classmethod
    def _estimate(cls, v: Any) -> Decimal:
        return parse_amount(v, "llm_prices.estimate")

    @field_validator("models")
    @classmethod
    def _models(cls, v: dict[str, ModelPrice]) -> dict[str, ModelPrice]:
        for name in v:
            if not _MODEL_PATTERN.match(name) or name == "":
                raise ValueError(f"llm_prices.models: {name!r} is a model id, or a prefix ending in * ('gpt-4o*', '*')")
        return v

    def price_for(self, model: str) -> ModelPrice | None:
        """The exact model's price, else the longest matching prefix's (`*` last)."""
        hit = self.models.get(model)
        if hit is not None:
            return hit
        best: tuple[int, ModelPrice] | None = None
        for name, price in self.models.items():
            if name.endswith("*") and model.startswith(name[:-1]) and (best is None or len(name) > best[0]):
                best = (len(name), price)
        return best[1] if best is not None else None


def unique_budget_names(budgets: list[BudgetSpec], rate_limit_names: list[str]) -> list[BudgetSpec]:
    names = [b.name for b in budgets]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"budget names must be unique: {dupes} declared more than once")
    clash = sorted(set(names) & set(rate_limit_names))
    if clash:
        raise ValueError(f"budget names {clash} are also rate limits' names; names are unique across both")
    return budgets
