"""`orproxy models`: the catalogue as a table, with the config's use of each model (chain
positions) and the models the config uses that the catalogue lacks.

Units: the catalogue's prices are USD per TOKEN; this view shows USD per MILLION tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from proxy.config import Config, Pricing
from proxy.core.pricing import PER_MILLION, PriceBook
from proxy.money.catalogue import CatalogueSource

if TYPE_CHECKING:
    from rich.table import Table


@dataclass(frozen=True, slots=True)
class ModelRow:
    id: str
    name: str
    listed: bool  # False: used by the config, absent from the catalogue
    prompt_usd_per_mtok: float | None
    completion_usd_per_mtok: float | None
    price_source: str  # catalogue | override | unpriced
    context_length: int | None
    used_by: tuple[str, ...]  # chain positions, e.g. ("cheap[0]", "code[1]")


@dataclass(frozen=True)
class ModelsView:
    source: str
    order: Literal["catalogue", "top-weekly"]
    rows: tuple[ModelRow, ...]
    notes: tuple[str, ...] = field(default=())


def chain_usage(config: Config | None) -> dict[str, list[str]]:
    """model id -> the chain positions using it, e.g. {'x/y': ['cheap[0]', 'balanced[2]']}."""
    usage: dict[str, list[str]] = {}
    for name, model in config.models.items() if config else ():
        for index, member in enumerate(model.chain or ()):
            usage.setdefault(member.model, []).append(f"{name}[{index}]")
    return usage


def _row(model_id: str, entry: Mapping[str, Any] | None, book: PriceBook, used_by: Sequence[str]) -> ModelRow:
    found = book.lookup(model_id)
    price, source = found if found else (None, "unpriced")
    context = None
    if entry is not None:
        context = entry.get("context_length") or (entry.get("top_provider") or {}).get("context_length")
    elif price is not None:
        context = price.context_length
    return ModelRow(
        model_id,
        str(entry.get("name", "")) if entry else "",
        entry is not None,
        price.prompt * PER_MILLION if price else None,
        price.completion * PER_MILLION if price else None,
        source,
        context,
        tuple(used_by),
    )


def build_models_view(config: Config | None, source: CatalogueSource, *, top_weekly: bool = False) -> ModelsView:
    """Pure: the rows of `orproxy models`, config-used models missing from the catalogue last."""
    book = PriceBook(source.catalogue, config.pricing if config else Pricing())
    usage = chain_usage(config)
    entries = {e["id"]: e for e in source.catalogue.raw if isinstance(e, Mapping) and "id" in e}
    rows = [_row(model_id, entry, book, usage.get(model_id, ())) for model_id, entry in entries.items()]
    rows += [_row(model_id, None, book, used) for model_id, used in usage.items() if model_id not in entries]
    notes = list(source.notes)
    order: Literal["catalogue", "top-weekly"] = "catalogue"
    if top_weekly and source.top_weekly:
        rank = {model_id: i for i, model_id in enumerate(source.top_weekly)}
        rows.sort(key=lambda r: (not r.listed, rank.get(r.id, len(rank))))  # stable: unranked keep their order
        order = "top-weekly"
    elif top_weekly:
        notes.append(
            f"top-weekly ordering is unavailable in {source.describe()}: run `orproxy models refresh` "
            "to fetch it; showing catalogue order"
        )
    missing = [r.id for r in rows if not r.listed]
    if missing:
        notes.append(f"used by the config but missing from the catalogue: {', '.join(missing)}")
    return ModelsView(source.describe(), order, tuple(rows), tuple(notes))


def _per_m(value: float | None) -> str:
    return "-" if value is None else f"{value:,.4f}".rstrip("0").rstrip(".")


def render_models(view: ModelsView) -> Table:
    # rich is imported here, not at the top: it is slow to import and the check path does not need it
    from rich.table import Table

    table = Table(
        title=f"Models from {view.source}, {view.order} order",
        title_justify="left",
        caption="prices in USD per MILLION tokens",
        caption_justify="left",
    )
    table.add_column("model")
    table.add_column("prompt $/M", justify="right")
    table.add_column("completion $/M", justify="right")
    table.add_column("context", justify="right")
    table.add_column("used by (chain position)")
    for row in view.rows:
        model = row.id if row.listed else f"{row.id} [bold red](missing from the catalogue)[/]"
        if row.price_source == "override":
            model += " [dim](override price)[/]"
        table.add_row(
            model,
            _per_m(row.prompt_usd_per_mtok),
            _per_m(row.completion_usd_per_mtok),
            f"{row.context_length:,}" if row.context_length else "-",
            ", ".join(row.used_by),
            style="bold" if row.used_by else None,
        )
    return table
