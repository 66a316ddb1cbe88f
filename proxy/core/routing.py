"""Pure: request features + config + a snapshot of member health -> an ordered plan.

No IO, no clocks, no aiohttp: the executor runs the plan, tests read it as a table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from proxy.config import Config, When
from proxy.core.errors import InvalidRequest
from proxy.core.features import RequestFeatures

# OpenRouter slugs look like vendor/model[:variant]; anything else that is not a
# virtual model is a typo, and gets a 404 naming the valid names.
DIRECT_SLUG = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-:+]+$")
# What each kind of virtual model (`models.NAME.kind`) serves, for the 400 a request of the other kind gets.
KIND_SERVES = {
    "chat": "chat requests (chat completions, Responses, Messages, legacy completions)",
    "embeddings": "POST /v1/embeddings",
}


@dataclass(frozen=True, slots=True)
class Target:
    """One model on one upstream: a chain member, the unit of retries and cooldowns."""

    model: str
    upstream: str

    def __str__(self) -> str:
        return self.model if self.upstream == "openrouter" else f"{self.model}@{self.upstream}"


@dataclass(frozen=True, slots=True)
class Block:
    """Why a target is not to be called right now, and until when (epoch seconds)."""

    reason: str  # cooldown | rate_limited | no_api_key
    until: float | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class RouteStep:
    virtual_model: str
    rule: str  # the key path of the rule that matched, e.g. models.auto.route[2]


@dataclass(frozen=True, slots=True)
class Plan:
    requested: str
    chain_owner: str | None  # the virtual model whose chain is used; None for a direct model
    steps: tuple[RouteStep, ...] = ()
    targets: tuple[Target, ...] = ()
    skipped: tuple[tuple[Target, Block], ...] = field(default=())
    rewrites: tuple[tuple[str, str], ...] = ()  # budget downgrades applied: (from, to)
    prompt_cache: bool = False  # the chain's owner has `prompt_cache: auto`

    @property
    def direct(self) -> bool:
        return self.chain_owner is None

    def head(self) -> str:
        """How the requested name became a chain, e.g. `auto>cheap` or `budget[quality->cheap] cheap`."""
        names = [step.virtual_model for step in self.steps]
        head = ">".join([*names, self.chain_owner]) if self.chain_owner else f"direct:{self.requested}"
        if self.rewrites:
            head = "budget[" + ",".join(f"{a}->{b}" for a, b in self.rewrites) + "] " + head
        return head

    def describe(self) -> str:
        """The plan in short, e.g. `auto>cheap: a, b (skip c: cooldown)`."""
        text = f"{self.head()}: {', '.join(map(str, self.targets)) or '-'}"
        if self.skipped:
            text += " (" + ", ".join(f"skip {t}: {b.reason}" for t, b in self.skipped) + ")"
        return text


class BlockLookup(Protocol):
    def __bool__(self) -> bool: ...
    def get(self, target: Target, /) -> Block | None: ...


class UnknownModel(LookupError):
    def __init__(self, requested: str, valid: list[str]) -> None:
        super().__init__(requested)
        self.requested = requested
        self.valid = valid


class Router:
    """Built once per config; `plan` is then a few dict lookups per request."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._chains: dict[str, tuple[Target, ...]] = {
            name: tuple(Target(m.model, m.upstream) for m in vm.chain)
            for name, vm in config.models.items()
            if vm.chain is not None
        }
        self._routes: dict[str, tuple[tuple[When, str, str], ...]] = {
            name: tuple((rule.when, rule.to, f"models.{name}.route[{i}]") for i, rule in enumerate(vm.route))
            for name, vm in config.models.items()
            if vm.route is not None
        }
        self.virtual_models: tuple[str, ...] = tuple(config.models)
        self.chain_models: tuple[str, ...] = tuple(self._chains)
        self._kinds: dict[str, str] = {name: vm.kind for name, vm in config.models.items()}
        self._prompt_cache = frozenset(name for name, vm in config.models.items() if vm.prompt_cache == "auto")

    def chain_models_of(self, kind: str) -> tuple[str, ...]:
        """The virtual models with a chain that serve requests of `kind` (chat | embeddings)."""
        return tuple(name for name in self.chain_models if self._kinds[name] == kind)

    def kind_of(self, name: str) -> str | None:
        """A virtual model's kind; None for a name that is not one."""
        return self._kinds.get(name)

    def chain_of(self, name: str) -> tuple[Target, ...]:
        return self._chains.get(name, ())

    def resolve(self, requested: str, features: RequestFeatures) -> tuple[str | None, tuple[RouteStep, ...]]:
        """Follow routing rules from a virtual model to the one whose chain is used."""
        if requested not in self._config.models:
            if self._config.allow_direct_models and DIRECT_SLUG.match(requested):
                return None, ()
            raise UnknownModel(requested, sorted(self._config.models))
        steps: list[RouteStep] = []
        name = requested
        while name in self._routes:  # the config loader guarantees no loops and a catch-all
            for when, to, where in self._routes[name]:
                if rule_matches(when, features):
                    steps.append(RouteStep(name, where))
                    name = to
                    break
            else:
                raise RuntimeError(f"no rule of {name!r} matched; the config check should have refused this")
        return name, tuple(steps)

    def plan(
        self,
        requested: str,
        features: RequestFeatures,
        blocked: BlockLookup | None = None,
        rewrite: Mapping[str, str] | None = None,
    ) -> Plan:
        """The ordered targets for a request. `rewrite` is a budget step's map (virtual -> cheaper
        virtual, "*" for any): it applies to the requested name and to the model routing lands on."""
        rewrites: tuple[tuple[str, str], ...] = ()
        name, kind = requested, features.kind
        if self._kinds.get(requested, kind) != kind:
            raise self._wrong_kind(requested, kind)
        if rewrite:
            if requested not in self._config.models:
                self.resolve(requested, features)  # an unknown name stays a 404, budget or not
            swapped = rewrite.get(requested) or rewrite.get("*")
            # "*" steps every model down, but only to one of the request's kind: an embeddings
            # request stepped down to a chat chain would fail on every member.
            if swapped and swapped != requested and self._kinds.get(swapped) == kind:
                name, rewrites = swapped, ((requested, swapped),)
        owner, steps = self.resolve(name, features)
        if rewrite and owner and owner != name:
            stepped = rewrite.get(owner, owner)
            if stepped != owner and self._kinds.get(stepped) == kind:
                rewrites += ((owner, stepped),)
                owner = stepped
        chain = self._chains[owner] if owner else (Target(requested, self._config.direct_upstream),)
        cache = owner in self._prompt_cache
        if not blocked:
            return Plan(requested, owner, steps, chain, (), rewrites, cache)
        targets, skipped = [], []
        for target in chain:
            block = blocked.get(target)
            if block is None:
                targets.append(target)
            else:
                skipped.append((target, block))
        return Plan(requested, owner, steps, tuple(targets), tuple(skipped), rewrites, cache)

    def _wrong_kind(self, name: str, wanted: str) -> InvalidRequest:
        """A 400 that names the model's kind, what it serves, and the models of the kind wanted."""
        kind = self._kinds[name]
        right = sorted(n for n, k in self._kinds.items() if k == wanted)
        return InvalidRequest(
            f"The model '{name}' is {_a(kind)} model (models.{name}.kind: {kind}): it serves {KIND_SERVES[kind]}, "
            f"not {KIND_SERVES[wanted]}. Use {_a(wanted)} model"
            + (f": {', '.join(right)}." if right else "; this proxy has none configured."),
            param="model",
            code="model_kind_mismatch",
        )


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def rule_matches(when: When, f: RequestFeatures) -> bool:
    if when.task is not None and f.task not in when.task:
        return False
    if when.has_tools is not None and f.has_tools != when.has_tools:
        return False
    if when.has_images is not None and f.has_images != when.has_images:
        return False
    if when.json_mode is not None and f.json_mode != when.json_mode:
        return False
    if when.stream is not None and f.stream != when.stream:
        return False
    if when.prompt_tokens_over is not None and not f.prompt_tokens > when.prompt_tokens_over:
        return False
    if when.prompt_tokens_under is not None and not f.prompt_tokens < when.prompt_tokens_under:
        return False
    pattern = when.last_user_message_matches
    return pattern is None or pattern.search(f.last_user_text) is not None
