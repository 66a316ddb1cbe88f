"""The model catalogue: a local cache of OpenRouter's /models, its refresh, and its checks of a config
(`orproxy models` shows it: `models_view`).

Where prices come from, first found wins:
1. `pricing.catalogue` in the config: the operator pinned a file on purpose;
2. the local cache written by `orproxy models refresh` (default data/models-cache.json);
3. the snapshot packaged with the proxy (proxy/data/openrouter-models.json).

The cache keeps OpenRouter's document shape (`data`: the model list) so `Catalogue.parse`
reads it unchanged, plus `fetched_at`, `source` and `top_weekly` (model ids in OpenRouter's
top-weekly order, from `/models?order=top-weekly`).

Units: the catalogue's prices are USD per TOKEN; messages show USD per MILLION tokens.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import aiohttp
import orjson

from proxy.config import DEFAULT_UPSTREAM, Config, SourceIssue
from proxy.core.pricing import PER_MILLION, Catalogue, PriceBook

DEFAULT_CACHE = Path("data/models-cache.json")
DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
TOP_WEEKLY = "top-weekly"

Origin = Literal["config", "cache", "snapshot"]


class CatalogueFetchError(RuntimeError):
    """OpenRouter's model list could not be fetched (offline, timeout, bad answer)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"could not reach {url}: {reason}")
        self.url = url
        self.reason = reason


@dataclass(frozen=True)
class CatalogueSource:
    """A catalogue and where it came from, for messages such as 'snapshot from 2026-11-20'."""

    catalogue: Catalogue
    origin: Origin
    location: str
    date: str | None  # snapshot date or fetch time
    top_weekly: tuple[str, ...] | None = None
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        when = f" from {self.date}" if self.date else ""
        kind = {
            "config": "the catalogue pinned by pricing.catalogue",
            "cache": "the refreshed cache",
            "snapshot": "the packaged snapshot",
        }[self.origin]
        return f"{kind} ({self.location}){when}"


# ------------------------------------------------------------------ loading


def packaged_snapshot() -> dict[str, Any]:
    return orjson.loads(resources.files("proxy").joinpath("data/openrouter-models.json").read_bytes())


def _source(document: Mapping[str, Any], origin: Origin, location: str, notes: tuple[str, ...] = ()) -> CatalogueSource:
    order = document.get("top_weekly")
    return CatalogueSource(
        Catalogue.parse(document),
        origin,
        location,
        document.get("fetched_at") or document.get("snapshot_date"),
        tuple(order) if isinstance(order, list) else None,
        notes,
    )


def load_catalogue_source(config: Config | None, cache_path: Path = DEFAULT_CACHE) -> CatalogueSource:
    """The catalogue the commands price with (see the module docstring for the order)."""
    pinned = config.pricing.catalogue if config is not None else None
    notes: list[str] = []
    if pinned:
        if cache_path.exists():
            notes.append(f"the config pins pricing.catalogue={pinned}, so the refreshed cache {cache_path} is not used")
        return _source(_read_json(Path(pinned)), "config", pinned, tuple(notes))
    if cache_path.exists():
        try:
            return _source(_read_json(cache_path), "cache", str(cache_path))
        except (OSError, ValueError) as exc:
            notes.append(
                f"the cache {cache_path} is unreadable ({exc}); run `orproxy models refresh` "
                "or delete it. Using the packaged snapshot"
            )
    return _source(packaged_snapshot(), "snapshot", "proxy/data/openrouter-models.json", tuple(notes))


def _is_model_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in value)


def _read_json(path: Path) -> dict[str, Any]:
    document = orjson.loads(path.read_bytes())
    if not isinstance(document, dict) or not _is_model_list(document.get("data")):
        raise ValueError(f"{path} is not a /models document (a JSON object whose `data` lists models with an `id`)")
    return document


# ------------------------------------------------------------------ refresh


def openrouter_base_url(config: Config | None) -> str:
    """The base URL of the config's OpenRouter upstream (the one named 'openrouter', else the first
    of OpenRouter's kind); OpenRouter's public URL without a config."""
    if config is None:
        return DEFAULT_BASE_URL
    upstream = config.upstreams.get(DEFAULT_UPSTREAM)
    if upstream is None:
        upstream = next((u for u in config.upstreams.values() if u.flavour == "openrouter"), None)
    return upstream.base_url if upstream is not None else DEFAULT_BASE_URL


async def _get_models(session: aiohttp.ClientSession, url: str, timeout_s: float) -> list[dict[str, Any]]:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            if response.status != 200:
                raise CatalogueFetchError(url, f"HTTP {response.status}: {(await response.text())[:200]}")
            document = orjson.loads(await response.read())
    except TimeoutError:
        raise CatalogueFetchError(url, f"no answer within {timeout_s:g} s (raise --timeout?)") from None
    except aiohttp.ClientError as exc:
        raise CatalogueFetchError(url, str(exc) or type(exc).__name__) from None
    except orjson.JSONDecodeError as exc:
        raise CatalogueFetchError(url, f"the answer is not JSON ({exc})") from None
    if not isinstance(document, dict) or not _is_model_list(document.get("data")):
        raise CatalogueFetchError(url, "the answer has no `data` list of models with an `id` each")
    return document["data"]


async def fetch_catalogue(
    base_url: str, *, timeout_s: float = 10.0, now: datetime | None = None, session: aiohttp.ClientSession | None = None
) -> dict[str, Any]:
    """Fetch `{base_url}/models` and its top-weekly order into a cache document.
    Raise CatalogueFetchError when the model list cannot be had; a missing top-weekly
    order only leaves `top_weekly` null (the catalogue itself is what matters)."""
    url = f"{base_url.rstrip('/')}/models"
    embeddings_url = f"{base_url.rstrip('/')}/embeddings/models"
    own_session = session is None
    session = session or aiohttp.ClientSession()
    try:
        models = await _get_models(session, url, timeout_s)
        try:
            ranked = await _get_models(session, f"{url}?order={TOP_WEEKLY}", timeout_s)
            top_weekly: list[str] | None = [m["id"] for m in ranked if isinstance(m, dict) and "id" in m]
        except CatalogueFetchError:
            top_weekly = None
        # OpenRouter's /models lists text models only; embedding models have a list of their own.
        try:
            embedding = await _get_models(session, embeddings_url, timeout_s)
        except CatalogueFetchError:
            embedding = []  # an upstream without embeddings: the chat catalogue is what matters
    finally:
        if own_session:
            await session.close()
    listed = {m["id"] for m in models}
    added = [m for m in embedding if m["id"] not in listed]
    fetched = (now or datetime.now(UTC)).astimezone(UTC)
    return {
        "fetched_at": fetched.isoformat(timespec="seconds"),
        "snapshot_date": fetched.date().isoformat(),
        "source": url,
        "embeddings_source": embeddings_url if added else None,
        "top_weekly": top_weekly,
        "data": models + added,
    }


def write_cache(path: Path, document: Mapping[str, Any]) -> None:
    """Write atomically: a reader never sees half a file, a failed write keeps the old cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(orjson.dumps(document))
    os.replace(temporary, path)


# ------------------------------------------------------------------ errors and warnings for `orproxy check`


def model_kinds(catalogue: Catalogue) -> dict[str, str]:
    """Model id -> `embeddings` or `chat`, for the entries whose `architecture` says (others unknown)."""
    kinds: dict[str, str] = {}
    for entry in catalogue.raw:
        architecture = entry.get("architecture") if isinstance(entry, Mapping) else None
        outputs = architecture.get("output_modalities") if isinstance(architecture, Mapping) else None
        if isinstance(outputs, list) and outputs and isinstance(entry.get("id"), str):
            kinds[entry["id"]] = "embeddings" if "embeddings" in outputs else "chat"
    return kinds


def kind_errors(config: Config, source: CatalogueSource) -> list[SourceIssue]:
    """Chain members of the other kind than their virtual model (an embedding model in a chat chain,
    or a chat model in an embeddings one), where the catalogue knows their kind: every request
    routed to them would fail."""
    kinds = model_kinds(source.catalogue)
    issues: list[SourceIssue] = []
    for name, model in config.models.items():
        for index, member in enumerate(model.chain or ()):
            kind = kinds.get(member.model)
            if kind is not None and kind != model.kind:
                issues.append(
                    SourceIssue(
                        ("models", name, "chain", index),
                        f"'{member.model}' is {'an embeddings' if kind == 'embeddings' else 'a chat'} model in the "
                        f"price catalogue ({source.describe()}), but models.{name} has kind {model.kind}: "
                        + (
                            f"put it in a virtual model with `kind: {kind}`"
                            if kind == "embeddings"
                            else "an embeddings model's chain takes embedding models only"
                        ),
                    )
                )
    return issues


def catalogue_errors(config: Config, source: CatalogueSource) -> list[SourceIssue]:
    """What makes a config wrong against its price catalogue, refused by `orproxy check`, `serve`
    and reloads: a chain member of the wrong kind (`kind_errors`), and a `pricing.savings_baseline`
    nobody can price, which would make every saving read as -100% of spend in reports, metrics and
    dashboards."""
    pricing = config.pricing
    book = PriceBook(source.catalogue, pricing)
    issues = kind_errors(config, source)
    if book.knows(pricing.savings_baseline):
        return issues
    known = sorted(set(source.catalogue.prices) | set(pricing.overrides))
    close = difflib.get_close_matches(pricing.savings_baseline, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(slug) for slug in close)}?" if close else "check the slug"
    return [
        *issues,
        SourceIssue(
            ("pricing", "savings_baseline"),
            f"'{pricing.savings_baseline}' is neither in the price catalogue ({source.describe()}) nor under "
            f"pricing.overrides, so savings could not be measured against it; {hint} "
            "(`orproxy models` lists the catalogue)",
        ),
    ]


def catalogue_warnings(
    config: Config, catalogue: Catalogue, *, dearer_factor: float = 3.0, previous: Catalogue | None = None
) -> list[str]:
    """Warnings about the config's chains against `catalogue`.

    - a member absent from `catalogue` but listed in `previous` (default: the packaged snapshot) is
      *delisted*; absent from both, it is *missing* (a typo, or a model OpenRouter never listed).
      A missing member priced by `pricing.overrides` is not reported; a delisted one always is.
    - a fallback whose blended price (prompt + completion USD per token, i.e. one prompt token plus
      one completion token) is more than `dearer_factor` times its primary's. A free or unpriced
      primary gives no ratio and is skipped.
    """
    previous = previous if previous is not None else Catalogue.parse(packaged_snapshot())
    listed = {e.get("id") for e in catalogue.raw} | set(catalogue.prices)
    before = {e.get("id") for e in previous.raw} | set(previous.prices)
    book = PriceBook(catalogue, config.pricing)
    overridden = set(config.pricing.overrides)
    warnings: list[str] = []
    for name, model in config.models.items():
        chain = model.chain or ()
        for index, member in enumerate(chain):
            where = f"models.{name}.chain[{index}]"
            if member.model in listed:
                if book.lookup(member.model) is None:
                    warnings.append(
                        f"{where}: '{member.model}' has no fixed price in the catalogue; "
                        "price it under pricing.overrides or it is charged at the dearest price"
                    )
            elif member.model in before:
                warnings.append(
                    f"{where}: '{member.model}' was delisted: it is no longer in the catalogue; "
                    "replace it, or requests to it will fail over to the next member"
                )
            elif member.model not in overridden:
                warnings.append(
                    f"{where}: '{member.model}' (upstream {member.upstream}) is not in the catalogue: "
                    "check the spelling, run `orproxy models refresh`, or price it under "
                    "pricing.overrides (until then it is charged at the dearest catalogue price)"
                )
        warnings.extend(_dearer_fallbacks(name, chain, book, dearer_factor))
    return warnings


def blended_per_token(book: PriceBook, model: str) -> float | None:
    found = book.lookup(model)
    return found[0].prompt + found[0].completion if found else None


def _dearer_fallbacks(name: str, chain: Sequence[Any], book: PriceBook, factor: float) -> list[str]:
    if not chain:
        return []
    primary = blended_per_token(book, chain[0].model)
    if not primary:
        return []
    out = []
    for index, member in enumerate(chain[1:], start=1):
        price = blended_per_token(book, member.model)
        if price is not None and price > factor * primary:
            out.append(
                f"models.{name}.chain[{index}]: fallback '{member.model}' costs "
                f"${price * PER_MILLION:,.4g}/M tokens blended (prompt + completion per million) vs "
                f"${primary * PER_MILLION:,.4g}/M for the primary '{chain[0].model}': "
                f"{price / primary:.1f}x, more than the {factor:g}x allowed"
            )
    return out
