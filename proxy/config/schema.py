"""The shape of config.yaml: frozen pydantic models, one per section.

Cross-references (rule targets, loops, upstream names) are checked in
`proxy.config`, which loads files and reports problems with their lines.
"""

from __future__ import annotations

import itertools
import re
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

DEFAULT_UPSTREAM = "openrouter"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Listen(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class Upstream(_Frozen):
    base_url: str
    # openrouter: OpenRouter's extra request fields pass through; openai: they are dropped,
    # since an OpenAI-style upstream would refuse them. Inferred from base_url when unset.
    kind: Literal["openrouter", "openai"] | None = None
    api_key_env: str = "OPENROUTER_API_KEY"
    timeout_s: float = Field(60.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    headers: dict[str, str] = Field(default_factory=dict)
    credits_poll_s: float = Field(60.0, ge=0)  # poll GET /key for the credit balance (openrouter kind; 0 = off)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @property
    def flavour(self) -> str:
        """The kind when no upstream name is at hand; `kind_for` is what the proxy uses."""
        return self.kind_for("")

    def kind_for(self, name: str) -> str:
        return self.inferred_kind(name)[0]

    def inferred_kind(self, name: str) -> tuple[str, str]:
        """(kind, why): set in the config, else `openrouter` for an upstream named so (a mirror or a
        local stand-in keeps OpenRouter's fields) or whose URL says so, else `openai`."""
        if self.kind is not None:
            return self.kind, "set in the config"
        if name == DEFAULT_UPSTREAM:
            return "openrouter", "inferred from its name"
        if "openrouter" in self.base_url.lower():
            return "openrouter", "inferred from its URL"
        return "openai", "inferred: neither its name nor its URL says openrouter"


def _member_shorthand(value: Any) -> Any:
    return {"model": value} if isinstance(value, str) else value


class ChainMember(_Frozen):
    model: str = Field(min_length=1)
    upstream: str = DEFAULT_UPSTREAM


class When(_Frozen):
    """Conditions of one routing rule; all that are set must hold."""

    task: tuple[str, ...] | None = None
    has_tools: bool | None = None
    has_images: bool | None = None
    json_mode: bool | None = None
    stream: bool | None = None
    prompt_tokens_over: int | None = Field(None, ge=0)
    prompt_tokens_under: int | None = Field(None, ge=0)
    last_user_message_matches: re.Pattern[str] | None = None

    @field_validator("task", mode="before", json_schema_input_type=str | list[str] | None)
    @classmethod
    def _task_list(cls, value: Any) -> Any:
        values = (value,) if isinstance(value, str) else value
        if isinstance(values, (list, tuple)):
            return tuple(v.strip().lower() if isinstance(v, str) else v for v in values)
        return values

    @field_validator("last_user_message_matches", mode="before")
    @classmethod
    def _compile(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return re.compile(value, re.IGNORECASE | re.DOTALL)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from exc
        return value

    def is_catch_all(self) -> bool:
        return all(getattr(self, name) is None for name in type(self).model_fields)


class Rule(_Frozen):
    when: When = When()
    to: str = Field(min_length=1)


ModelKind = Literal["chat", "embeddings"]


class VirtualModel(_Frozen):
    description: str = ""
    # What its chain holds: chat models (chat, Responses, Messages, legacy completions) or
    # embedding models (POST /v1/embeddings); a request of the other kind is refused with a 400.
    kind: ModelKind = Field("chat", description="chat | embeddings: the kind of models its chain holds")
    # auto: a request to an Anthropic-family member on OpenRouter gets a top-level `cache_control`
    # (OpenRouter's automatic prompt caching) when the client marked nothing for caching itself.
    prompt_cache: Literal["off", "auto"] = Field(
        "off", description="auto: add OpenRouter's top-level cache_control for Anthropic-family members"
    )
    chain: (
        tuple[Annotated[ChainMember, BeforeValidator(_member_shorthand, json_schema_input_type=str | ChainMember)], ...]
        | None
    ) = None
    route: tuple[Rule, ...] | None = None

    @model_validator(mode="after")
    def _chain_xor_route(self) -> VirtualModel:
        if (self.chain is None) == (self.route is None):
            raise ValueError("needs exactly one of `chain` (a list of models) or `route` (a list of rules)")
        if self.chain is not None and not self.chain:
            raise ValueError("`chain` must list at least one model")
        if self.route is not None and not self.route:
            raise ValueError("`route` must list at least one rule")
        if self.kind == "embeddings" and self.prompt_cache == "auto":
            raise ValueError("`prompt_cache: auto` applies to chat models; an embeddings model has no prompt to cache")
        return self


class Cooldown(_Frozen):
    failures: int = Field(3, ge=1)
    window_s: float = Field(60.0, gt=0)
    cooldown_s: float = Field(30.0, ge=0)


class Retry(_Frozen):
    attempts_per_model: int = Field(2, ge=1, le=10)
    backoff_s: float = Field(0.2, ge=0)
    backoff_max_s: float = Field(5.0, ge=0)
    max_retry_after_s: float = Field(10.0, ge=0)
    # The longest an upstream may keep a member blocked (Retry-After, rate-limit resets): one
    # `Retry-After: 1e9` must not take a model away until a restart.
    max_block_s: float = Field(3600.0, gt=0)
    cooldown: Cooldown = Cooldown()


class DowngradeStep(_Frozen):
    at: float = Field(gt=0, le=1, description="fraction of the daily (or monthly) budget spent")
    map: dict[str, str] = Field(min_length=1, description='virtual model -> cheaper virtual model; "*" = any')


class Budget(_Frozen):
    daily_usd: float | None = Field(None, gt=0)
    monthly_usd: float | None = Field(None, gt=0)
    downgrade: tuple[DowngradeStep, ...] = ()
    on_exhausted: Literal["reject", "cheapest"] = "reject"
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone '{value}' (use an IANA name such as UTC or Europe/Paris)") from None
        return value

    @field_validator("downgrade")
    @classmethod
    def _ascending(cls, steps: tuple[DowngradeStep, ...]) -> tuple[DowngradeStep, ...]:
        if any(a.at >= b.at for a, b in itertools.pairwise(steps)):
            raise ValueError("steps must be listed with strictly increasing `at`")
        return steps


class ProxyKey(_Frozen):
    """A client key: only its hash or the name of the env variable holding it live in the config."""

    name: str = Field(min_length=1, pattern=r"^[\w.\-]+$")
    key_env: str | None = None
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    daily_usd: float | None = Field(None, gt=0)
    monthly_usd: float | None = Field(None, gt=0)
    models: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _one_secret(self) -> ProxyKey:
        if (self.key_env is None) == (self.key_sha256 is None):
            raise ValueError(
                "needs exactly one of `key_env` (an environment variable holding the key) "
                "or `key_sha256` (the hex SHA-256 of the key)"
            )
        return self


class PriceOverride(_Frozen):
    """Prices per MILLION tokens, the unit providers publish (the catalogue stores per-token prices)."""

    prompt_usd_per_mtok: float = Field(ge=0)
    completion_usd_per_mtok: float = Field(ge=0)
    cache_read_usd_per_mtok: float | None = Field(None, ge=0)  # cached prompt tokens; default: the prompt price
    cache_write_usd_per_mtok: float | None = Field(None, ge=0)  # prompt tokens written to the cache; default: prompt


class Pricing(_Frozen):
    savings_baseline: str = "openai/gpt-4o-mini"
    overrides: dict[str, PriceOverride] = Field(default_factory=dict)
    catalogue: str | None = None  # a models.json in OpenRouter's format; default: the packaged snapshot


class Ledger(_Frozen):
    # sqlite: one file (`path`), one process. postgres: one database for every worker and replica,
    # reached by `dsn`, or better by the environment variable `dsn_env` names (a password stays out of the file).
    backend: Literal["sqlite", "postgres"] = "sqlite"
    path: str = "data/ledger.sqlite3"
    retention_days: int = Field(400, ge=1)
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    # sqlite: under load, a commit waits up to this long for other requests in flight to join its
    # group (one commit for many rows); with nothing else in flight it never waits. 0: never.
    commit_delay_ms: float = Field(2.0, ge=0, le=100)
    dsn: str | None = None  # postgresql://user@host:5432/db
    dsn_env: str | None = None

    @model_validator(mode="after")
    def _postgres_dsn(self) -> Ledger:
        if self.backend == "postgres" and (self.dsn is None) == (self.dsn_env is None):
            raise ValueError(
                "`backend: postgres` needs exactly one of `dsn` (postgresql://user@host:5432/db) "
                "or `dsn_env` (an environment variable holding it)"
            )
        if self.backend == "sqlite" and (self.dsn is not None or self.dsn_env is not None):
            raise ValueError("`dsn` and `dsn_env` are for `backend: postgres`; the sqlite ledger is `path`")
        if self.dsn is not None and not re.match(r"^postgres(ql)?://", self.dsn):
            raise ValueError("`dsn` must be a postgresql:// URL")
        return self


class Cache(_Frozen):
    """The exact-match response cache (on per request: `temperature: 0` or `X-Proxy-Cache: on`)."""

    enabled: bool = True
    ttl_s: float = Field(86400.0, gt=0)
    max_entries: int = Field(10_000, ge=1)
    max_entry_bytes: int = Field(1_048_576, ge=1024)
    path: str = "data/cache.sqlite3"


class State(_Frozen):
    """Where the shared state lives: spend and holds, breakers, rate-limit blocks, the response cache.
    `local`: in this process (one process, the default); `redis`: shared by every replica and worker."""

    backend: Literal["local", "redis"] = "local"
    url: str | None = Field(None, description="redis://host:port/db (or rediss://); or name a variable in url_env")
    url_env: str | None = Field(
        None, description="an environment variable holding the Redis URL (it may hold a password)"
    )
    prefix: str = Field(
        "orproxy:", min_length=1, description="prepended to every Redis key: replicas of one proxy share it"
    )
    # fail_closed: while Redis is unreachable, requests are answered 503 (no budget can be checked);
    # local: each replica falls back to its own in-process state (logged once) and re-seeds when Redis is back.
    on_state_error: Literal["fail_closed", "local"] = "fail_closed"
    timeout_ms: int = Field(500, ge=10, le=10_000, description="socket timeout of one Redis call, milliseconds")

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(redis|rediss|unix)://", value):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @model_validator(mode="after")
    def _where(self) -> State:
        if self.backend == "redis" and (self.url is None) == (self.url_env is None):
            raise ValueError(
                "`backend: redis` needs exactly one of `url` (redis://host:6379/0) or `url_env` "
                "(an environment variable holding it)"
            )
        return self


class Admin(_Frozen):
    key_env: str | None = None


class RateLimitPolicy(_Frozen):
    warn_below: float = Field(0.1, ge=0, le=1)  # log a warning when an upstream's remaining falls under this share


class Server(_Frozen):
    """Limits on client connections: a slow or greedy client must not starve the others."""

    # From accepting a connection (or the first byte of the next request on a kept-alive one) to the
    # end of the request's headers; past it the connection is closed.
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(60.0, gt=0)  # reading a request's whole body, once its headers are in: else 408
    keepalive_timeout_s: float = Field(75.0, gt=0)  # an idle kept-alive connection is closed after this
    # Open client connections at once (capped below the process's file limit at start-up). At the cap,
    # the connection that has waited longest without a request is closed for the new one; when every
    # connection is busy with a request, the new one gets a 503.
    max_connections: int = Field(1000, ge=1)
    max_connections_per_client: int | None = Field(None, ge=1)  # per client IP address; None: no cap


class MetricsEndpoint(_Frozen):
    # With client keys configured, GET /metrics needs the admin key or this one (a scraper's key).
    key_env: str | None = None


class Logging(_Frozen):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = True


class Batches(_Frozen):
    """OpenAI's Batch API on the proxy (`proxy.batch`): how batch lines run beside live traffic."""

    concurrency: int = Field(10, ge=1, le=1000)  # batch lines in flight at once, over every batch
    # The share of each day's budget (budget.daily_usd, and a key's daily_usd) batch work may spend;
    # past it, batches pause until the next day (or until they expire). 1.0: no cap of their own.
    budget_share: float = Field(1.0, gt=0, le=1)
    prefer: Literal["chain", "cheapest"] = "chain"  # cheapest: each line tries its chain's cheapest member first
    upstream: Literal["proxy", "openrouter"] = "proxy"  # openrouter: OpenRouter's own Batch API where it takes them
    # Interactive requests in flight at or above which batch lines stop dispatching ("high load").
    busy_in_flight: int = Field(8, ge=1)
    poll_s: float = Field(30.0, gt=0)  # how often an OpenRouter batch is polled
    max_lines: int = Field(50_000, ge=1)  # lines per input file (OpenAI's limit)
    max_file_bytes: int = Field(200 * 1024 * 1024, ge=1024)  # an uploaded file's size (OpenAI's limit)


class Config(_Frozen):
    listen: Listen = Listen()
    upstreams: dict[str, Upstream] = Field(min_length=1)
    models: dict[str, VirtualModel] = Field(min_length=1)
    retry: Retry = Retry()
    allow_direct_models: bool = True
    direct_upstream: str = DEFAULT_UPSTREAM
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    watch_config: bool = True  # reload when the file changes (SIGHUP and POST /admin/reload always work)
    shutdown_timeout_s: float = Field(30.0, ge=0)  # SIGTERM: how long requests in flight may take to finish
    logging: Logging = Logging()
    budget: Budget = Budget()
    keys: tuple[ProxyKey, ...] = ()
    pricing: Pricing = Pricing()
    ledger: Ledger = Ledger()
    cache: Cache = Cache()
    state: State = State()
    rate_limits: RateLimitPolicy = RateLimitPolicy()
    admin: Admin = Admin()
    server: Server = Server()
    metrics: MetricsEndpoint = MetricsEndpoint()
    batches: Batches = Batches()

    @field_validator("keys")
    @classmethod
    def _unique_key_names(cls, keys: tuple[ProxyKey, ...]) -> tuple[ProxyKey, ...]:
        names = [key.name for key in keys]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"key names must be unique; repeated: {', '.join(duplicated)}")
        return keys

    def route_targets(self, name: str) -> tuple[str, ...]:
        model = self.models[name]
        return tuple(rule.to for rule in model.route or ())


class RoutingPart(BaseModel):
    """The keys the reference checks read: validated alone when another section is broken,
    so one bad edit elsewhere does not hide a dangling rule."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    upstreams: dict[str, Upstream] = Field(min_length=1)
    models: dict[str, VirtualModel] = Field(min_length=1)
    allow_direct_models: bool = True
    direct_upstream: str = DEFAULT_UPSTREAM
