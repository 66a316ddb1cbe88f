"""Spend reports from the ledger: the same numbers for `orproxy report` and GET /admin/spend."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo

from proxy.core.budget import BudgetCalendar
from proxy.money.ledger_api import GroupBy, LedgerStore
from proxy.money.ledger_rows import SummaryRow

if TYPE_CHECKING:  # rich is for the command line: a serving proxy does not load it (5 MB)
    from rich.table import Table

Period = Literal["day", "month"]
PERIODS = ("day", "month")
GROUPS = ("model", "virtual", "key", "api", "batch")


def period_bounds(period: Period, timezone: str, now: float) -> tuple[float, float]:
    calendar = BudgetCalendar.at(ZoneInfo(timezone), now)
    if period == "day":
        return calendar.day_start, calendar.day_end
    return calendar.month_start, calendar.month_end


async def spend_report(ledger: LedgerStore, period: Period, by: GroupBy, timezone: str, now: float) -> dict[str, Any]:
    start, end = period_bounds(period, timezone, now)
    rows = await ledger.summary(start, end, by)
    total = await ledger.totals(start, end)
    tz = ZoneInfo(timezone)
    return {
        "period": period,
        "by": by,
        "timezone": timezone,
        "start": datetime.fromtimestamp(start, tz).isoformat(),
        "end": datetime.fromtimestamp(end, tz).isoformat(),
        "rows": [_row(r) for r in rows],
        "total": _row(total),
    }


def _row(row: SummaryRow) -> dict[str, Any]:
    data = asdict(row)
    data["group"] = data["group"] or "(none)"
    return data


def render(report: dict[str, Any]) -> Table:
    from rich.table import Table

    title = f"Spend by {report['by']}, {report['period']} from {report['start'][:16]} ({report['timezone']})"
    table = Table(title=title, title_justify="left")
    table.add_column(report["by"])
    for name in (
        "requests",
        "prompt tok",
        "completion tok",
        "cost $",
        "avg $",
        "max $",
        "baseline $",
        "saved $",
        "saved %",
        "cache hits",
        "cache saved $",
    ):
        table.add_column(name, justify="right")
    for row in report["rows"]:
        table.add_row(*_cells(row))
    table.add_section()
    table.add_row(*_cells(report["total"]), style="bold")
    return table


def _cells(row: dict[str, Any]) -> list[str]:
    pct = row["savings_pct"]
    return [
        row["group"],
        f"{row['requests']:,}",
        f"{row['prompt_tokens']:,}",
        f"{row['completion_tokens']:,}",
        f"{row['cost_usd']:.6f}",
        f"{row['avg_cost_usd']:.6f}",
        f"{row['max_cost_usd']:.6f}",
        f"{row['baseline_cost_usd']:.6f}",
        f"{row['savings_usd']:.6f}",
        "-" if pct is None else f"{pct:.1f}",
        f"{row['cache_hits']:,}",
        f"{row['cache_saved_usd']:.6f}",
    ]
