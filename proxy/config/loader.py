"""config.yaml -> frozen, validated objects.

`proxy.schema` checks the shape (types, ranges, unknown keys); this module
checks what a schema cannot: every rule target and upstream exists, routes do
not loop, every route ends in a catch-all. Every problem is reported with the
file, the line and the key path, all at once, so an operator fixes a broken
edit in one pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path as FsPath
from typing import Any

from pydantic import ValidationError

from proxy.config.schema import (
    Config,
    RoutingPart,
    VirtualModel,
)
from proxy.config.yamlsrc import Path, SourceIssue, YamlDocument, YamlSyntaxError, parse_yaml

MAX_ROUTE_DEPTH = 16


class ConfigError(ValueError):
    """A config that must not be loaded; `issues` holds every problem found."""

    def __init__(self, filename: str, issues: list[SourceIssue]) -> None:
        self.filename = filename
        self.issues = issues
        super().__init__("\n".join(issue.render(filename) for issue in issues))


def _check_references(config: Config | RoutingPart) -> list[SourceIssue]:
    """What the schema cannot see: dangling names, loops, unreachable rules."""
    issues: list[SourceIssue] = []
    upstreams = set(config.upstreams)
    if config.allow_direct_models and config.direct_upstream not in upstreams:
        issues.append(
            SourceIssue(
                ("direct_upstream",),
                f"names upstream '{config.direct_upstream}', which is not under `upstreams` "
                f"(known: {', '.join(sorted(upstreams))})",
            )
        )
    for name, model in config.models.items():
        for index, member in enumerate(model.chain or ()):
            if member.upstream not in upstreams:
                issues.append(
                    SourceIssue(
                        ("models", name, "chain", index, "upstream"),
                        f"unknown upstream '{member.upstream}' (known: {', '.join(sorted(upstreams))})",
                    )
                )
        for index, rule in enumerate(model.route or ()):
            path: Path = ("models", name, "route", index)
            if rule.to not in config.models:
                issues.append(
                    SourceIssue(
                        (*path, "to"),
                        f"routes to '{rule.to}', which is not a virtual model "
                        f"(known: {', '.join(sorted(config.models))})",
                    )
                )
            elif config.models[rule.to].kind != model.kind:
                issues.append(SourceIssue((*path, "to"), _kind_mismatch("routes", name, rule.to, config.models)))
            if rule.when.is_catch_all() and index < len(model.route or ()) - 1:
                issues.append(
                    SourceIssue(path, "matches every request, so the rules after it can never match; move it last")
                )
        if model.route and not model.route[-1].when.is_catch_all():
            issues.append(
                SourceIssue(
                    ("models", name, "route"),
                    "has no catch-all rule, so some requests would match nothing; "
                    "end it with a rule without `when`, e.g. `- {to: cheap}`",
                )
            )
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
                issues.append(
                    SourceIssue(
                        path,
                        f"steps down to '{target}', which is not a virtual model with a "
                        f"`chain` (known: {', '.join(sorted(chains))})",
                    )
                )
            elif source in config.models and config.models[source].kind != config.models[target].kind:
                issues.append(SourceIssue(path, _kind_mismatch("steps", source, target, config.models)))
    for index, key in enumerate(config.keys):
        for position, name in enumerate(key.models or ()):
            if name not in config.models:
                issues.append(
                    SourceIssue(
                        ("keys", index, "models", position),
                        f"'{name}' is not a virtual model (known: {', '.join(sorted(config.models))})",
                    )
                )
    return issues


def _kind_mismatch(verb: str, source: str, target: str, models: Mapping[str, VirtualModel]) -> str:
    """A route or a budget step that would send one kind of request to the other kind's models."""
    kind, other = models[source].kind, models[target].kind
    return (
        f"{verb} '{source}' (kind: {kind}) to '{target}' (kind: {other}): {kind} requests can only be "
        f"served by {kind} models; pick a target of kind {kind}"
    )


def _find_loops(config: Config | RoutingPart) -> list[SourceIssue]:
    issues: list[SourceIssue] = []
    reported: set[frozenset[str]] = set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        model = config.models.get(name)
        if model is None or model.route is None:
            return
        for index, rule in enumerate(model.route):
            if rule.to in trail or rule.to == name:
                start = trail.index(rule.to) if rule.to in trail else len(trail)
                cycle = (*trail[start:], name, rule.to)
                key = frozenset(cycle)
                if key not in reported:
                    reported.add(key)
                    issues.append(
                        SourceIssue(("models", name, "route", index, "to"), f"routing loop: {' -> '.join(cycle)}")
                    )
            elif len(trail) < MAX_ROUTE_DEPTH:
                visit(rule.to, (*trail, name))

    for name in config.models:
        visit(name, ())
    return issues


def _pydantic_issues(exc: ValidationError) -> list[SourceIssue]:
    issues = []
    for error in exc.errors():
        # Pydantic appends the union branch / validator name to loc; keep the data path only.
        path = tuple(
            part
            for part in error["loc"]
            if not (isinstance(part, str) and ("[" in part or part.startswith("function-")))
        )
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
        # When the routing keys themselves are broken, they are already reported above.
        with contextlib.suppress(ValidationError):
            issues.extend(_check_references(RoutingPart.model_validate(doc.data)))
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


class ConfigMissing(ConfigError):
    """There is no file at the path given: not an invalid config, a missing one."""


def load_config(path: str | FsPath) -> Config:
    """Read, validate, and resolve the relative data paths (`ledger.path`, `cache.path`,
    `pricing.catalogue`) against the config file's folder, not the working directory: the proxy
    writes to the same place wherever it is started from."""
    fs_path = FsPath(path)
    try:
        text = fs_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigMissing(str(fs_path), [SourceIssue((), "there is no config file here")]) from None
    except OSError as exc:
        raise ConfigError(str(fs_path), [SourceIssue((), f"cannot read the config file: {exc.strerror}")]) from None
    return resolve_paths(parse_config(text, str(fs_path)), fs_path.parent)


def located_error(path: str | FsPath, issues: list[SourceIssue]) -> ConfigError:
    """A ConfigError for problems found after loading (against the price catalogue, say), with
    the line of each key looked up in the file as it is."""
    fs_path = FsPath(path)
    try:
        doc = parse_yaml(fs_path.read_text(encoding="utf-8"))
    except (OSError, YamlSyntaxError):
        return ConfigError(str(fs_path), issues)
    return ConfigError(str(fs_path), [_with_line(issue, doc) for issue in issues])


def resolve_paths(config: Config, base: FsPath) -> Config:
    """`config` with its relative file paths made absolute against `base`."""

    def resolved(value: str) -> str:
        path = FsPath(value).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    pricing = config.pricing
    return config.model_copy(
        update={
            "ledger": config.ledger.model_copy(update={"path": resolved(config.ledger.path)}),
            "cache": config.cache.model_copy(update={"path": resolved(config.cache.path)}),
            "pricing": pricing.model_copy(
                update={"catalogue": resolved(pricing.catalogue) if pricing.catalogue else None}
            ),
        }
    )
