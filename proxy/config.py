"""config.yaml -> frozen, validated objects.

Pydantic checks the shape (types, ranges, unknown keys); `_check_references`
checks what a schema cannot: every rule target and upstream exists, routes do
not loop, every route ends in a catch-all. Every problem is reported with the
file, the line and the key path, all at once, so an operator fixes a broken
edit in one pass.
"""

from __future__ import annotations

import re
from pathlib import Path as FsPath
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      field_validator, model_validator)

from .yamlsrc import Path, SourceIssue, YamlDocument, YamlSyntaxError, format_path, parse_yaml

DEFAULT_UPSTREAM = "openrouter"
MAX_ROUTE_DEPTH = 16


class ConfigError(ValueError):
    """A config that must not be loaded; `issues` holds every problem found."""

    def __init__(self, filename: str, issues: list[SourceIssue]) -> None:
        self.filename = filename
        self.issues = issues
        super().__init__("\n".join(issue.render(filename) for issue in issues))


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
        if self.kind is not None:
            return self.kind
        return "openrouter" if "openrouter" in self.base_url else "openai"


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


class VirtualModel(_Frozen):
    description: str = ""
    chain: tuple[Annotated[ChainMember, BeforeValidator(_member_shorthand,
                                                        json_schema_input_type=str | ChainMember)], ...] | None = None
    route: tuple[Rule, ...] | None = None

    @model_validator(mode="after")
    def _chain_xor_route(self) -> VirtualModel:
        if (self.chain is None) == (self.route is None):
            raise ValueError("needs exactly one of `chain` (a list of models) or `route` (a list of rules)")
        if self.chain is not None and not self.chain:
            raise ValueError("`chain` must list at least one model")
        if self.route is not None and not self.route:
            raise ValueError("`route` must list at least one rule")
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
        if any(a.at >= b.at for a, b in zip(steps, steps[1:])):
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
            raise ValueError("needs exactly one of `key_env` (an environment variable holding the key) "
                             "or `key_sha256` (the hex SHA-256 of the key)")
        return self


class PriceOverride(_Frozen):
    """Prices per MILLION tokens, the unit providers publish (the catalogue stores per-token prices)."""

    prompt_usd_per_mtok: float = Field(ge=0)
    completion_usd_per_mtok: float = Field(ge=0)


class Pricing(_Frozen):
    savings_baseline: str = "openai/gpt-4o-mini"
    overrides: dict[str, PriceOverride] = Field(default_factory=dict)
    catalogue: str | None = None  # a models.json in OpenRouter's format; default: the packaged snapshot


class Ledger(_Frozen):
    path: str = "data/ledger.sqlite3"
    retention_days: int = Field(400, ge=1)
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"


class Cache(_Frozen):
    """The exact-match response cache (on per request: `temperature: 0` or `X-Proxy-Cache: on`)."""

    enabled: bool = True
    ttl_s: float = Field(86400.0, gt=0)
    max_entries: int = Field(10_000, ge=1)
    max_entry_bytes: int = Field(1_048_576, ge=1024)
    path: str = "data/cache.sqlite3"


class Admin(_Frozen):
    key_env: str | None = None


class Logging(_Frozen):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = True


class Config(_Frozen):
    listen: Listen = Listen()
    upstreams: dict[str, Upstream] = Field(min_length=1)
    models: dict[str, VirtualModel] = Field(min_length=1)
    retry: Retry = Retry()
    allow_direct_models: bool = True
    direct_upstream: str = DEFAULT_UPSTREAM
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    watch_config: bool = True          # reload when the file changes (SIGHUP and POST /admin/reload always work)
    shutdown_timeout_s: float = Field(30.0, ge=0)  # SIGTERM: how long requests in flight may take to finish
    logging: Logging = Logging()
    budget: Budget = Budget()
    keys: tuple[ProxyKey, ...] = ()
    pricing: Pricing = Pricing()
    ledger: Ledger = Ledger()
    cache: Cache = Cache()
    admin: Admin = Admin()

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


class _RoutingPart(BaseModel):
    """The keys the reference checks read: validated alone when another section is broken,
    so one bad edit elsewhere does not hide a dangling rule."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    upstreams: dict[str, Upstream] = Field(min_length=1)
    models: dict[str, VirtualModel] = Field(min_length=1)
    allow_direct_models: bool = True
    direct_upstream: str = DEFAULT_UPSTREAM


def _check_references(config: Config | _RoutingPart) -> list[SourceIssue]:
    """What the schema cannot see: dangling names, loops, unreachable rules."""
    issues: list[SourceIssue] = []
    upstreams = set(config.upstreams)
    if config.allow_direct_models and config.direct_upstream not in upstreams:
        issues.append(SourceIssue(("direct_upstream",),
                                  f"names upstream '{config.direct_upstream}', which is not under `upstreams` "
                                  f"(known: {', '.join(sorted(upstreams))})"))
    for name, model in config.models.items():
        for index, member in enumerate(model.chain or ()):
            if member.upstream not in upstreams:
                issues.append(SourceIssue(("models", name, "chain", index, "upstream"),
                                          f"unknown upstream '{member.upstream}' "
                                          f"(known: {', '.join(sorted(upstreams))})"))
        for index, rule in enumerate(model.route or ()):
            path: Path = ("models", name, "route", index)
            if rule.to not in config.models:
                issues.append(SourceIssue(path + ("to",),
                                          f"routes to '{rule.to}', which is not a virtual model "
                                          f"(known: {', '.join(sorted(config.models))})"))
            if rule.when.is_catch_all() and index < len(model.route or ()) - 1:
                issues.append(SourceIssue(path, "matches every request, so the rules after it can never match; "
                                                "move it last"))
        if model.route and not model.route[-1].when.is_catch_all():
            issues.append(SourceIssue(("models", name, "route"),
                                      "has no catch-all rule, so some requests would match nothing; "
                                      "end it with a rule without `when`, e.g. `- {to: cheap}`"))
    issues.extend(_find_loops(config))
    if isinstance(config, Config):
        issues.extend(_check_money_references(config))
    return issues


def _check_money_references(config: Config) -> list[SourceIssue]:
    issues: list[SourceIssue] = []
    chains = {name for name, model in config.models.items() if model.chain is not None}
    for index, step in enumerate(config.budget.downgrade):
        for source, target in step.map.items():
            path: Path = ("budget", "downgrade", index, "map", source)
            if source != "*" and source not in config.models:
                issues.append(SourceIssue(path, f"'{source}' is not a virtual model"))
            if target not in chains:
                issues.append(SourceIssue(path, f"steps down to '{target}', which is not a virtual model with a "
                                                f"`chain` (known: {', '.join(sorted(chains))})"))
    for index, key in enumerate(config.keys):
        for position, name in enumerate(key.models or ()):
            if name not in config.models:
                issues.append(SourceIssue(("keys", index, "models", position),
                                          f"'{name}' is not a virtual model (known: {', '.join(sorted(config.models))})"))
    return issues


def _find_loops(config: Config | _RoutingPart) -> list[SourceIssue]:
    issues: list[SourceIssue] = []
    reported: set[frozenset[str]] = set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        model = config.models.get(name)
        if model is None or model.route is None:
            return
        for index, rule in enumerate(model.route):
            if rule.to in trail or rule.to == name:
                start = trail.index(rule.to) if rule.to in trail else len(trail)
                cycle = trail[start:] + (name, rule.to)
                key = frozenset(cycle)
                if key not in reported:
                    reported.add(key)
                    issues.append(SourceIssue(("models", name, "route", index, "to"),
                                              f"routing loop: {' -> '.join(cycle)}"))
            elif len(trail) < MAX_ROUTE_DEPTH:
                visit(rule.to, trail + (name,))

    for name in config.models:
        visit(name, ())
    return issues


def _pydantic_issues(exc: ValidationError) -> list[SourceIssue]:
    issues = []
    for error in exc.errors():
        # Pydantic appends the union branch / validator name to loc; keep the data path only.
        path = tuple(part for part in error["loc"] if not (isinstance(part, str) and ("[" in part or part.startswith("function-"))))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key (check its spelling and indentation)"
        elif error["type"] == "missing":
            message = "is required"
        issues.append(SourceIssue(path, message))
    return issues


def parse_config(text: str, filename: str = "<config>") -> Config:
    """Validate config text; raise ConfigError naming every bad key, with its line."""
    try:
        doc = parse_yaml(text)
    except YamlSyntaxError as exc:
        raise ConfigError(filename, [SourceIssue((), exc.message, exc.line)]) from None
    if not isinstance(doc.data, dict):
        raise ConfigError(filename, [SourceIssue((), "the config must be a YAML mapping (key: value)", 1)])
    issues = list(doc.issues)
    config = None
    try:
        config = Config.model_validate(doc.data)
        issues.extend(_check_references(config))
    except ValidationError as exc:
        issues.extend(_pydantic_issues(exc))
        try:
            issues.extend(_check_references(_RoutingPart.model_validate(doc.data)))
        except ValidationError:
            pass  # the routing keys themselves are broken: already reported above
    if issues:
        located = sorted((_with_line(issue, doc) for issue in issues), key=lambda i: i.line or 0)
        raise ConfigError(filename, located)
    assert config is not None
    return config


def _with_line(issue: SourceIssue, doc: YamlDocument) -> SourceIssue:
    if issue.line is not None:
        return issue
    return SourceIssue(issue.path, issue.message, doc.line_of(issue.path))


def config_json_schema() -> dict[str, Any]:
    """The JSON Schema of config.yaml, published as config.schema.json for editors."""
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "openrouter-proxy config.yaml"
    return schema


def load_config(path: str | FsPath) -> Config:
    fs_path = FsPath(path)
    try:
        text = fs_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(fs_path), [SourceIssue((), f"cannot read the config file: {exc.strerror}")]) from None
    return parse_config(text, str(fs_path))


__all__ = ["config_json_schema", "Budget", "ChainMember", "Config", "ConfigError", "Cooldown", "DowngradeStep", "PriceOverride",
           "Pricing", "ProxyKey", "Retry", "Rule", "Upstream", "VirtualModel", "When", "format_path", "load_config",
           "parse_config"]
