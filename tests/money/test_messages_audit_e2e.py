"""The auditor's run for the Messages API: Anthropic SDK traffic (whole and streamed answers, a
fallback after a 503, cached system prompts, OpenRouter's own paths) beside a chat request, then
the emulator's bill against the ledger generation by generation, `orproxy report --by api` and
the metrics' `api` label: each API's spend to the nano-dollar, and no API's spend in another's."""

from __future__ import annotations

import anthropic
import pytest

from proxy.emulator import Fault
from proxy.http.appkeys import METRICS
from proxy.money.ledger_rows import to_nano
from tests.http.test_messages_e2e import HELLO, LONG_SYSTEM, SONNET, client
from tests.support.audit import billed_nano, booked_nano, report_json, settled
from tests.support.gateway import proxy_config_text

NANO = 1e-9


async def test_each_apis_spend_is_reported_and_labelled_to_the_nano_dollar(make_proxy, emulator, tmp_path):
    config, ledger = tmp_path / "config.yaml", tmp_path / "ledger.sqlite3"
    config.write_text(proxy_config_text(emulator.url))
    proxy = await make_proxy(config_text=config.read_text(), ledger_path=ledger)
    sdk, prefixed = client(proxy), client(proxy, "/api")
    await sdk.messages.create(model="quality", max_tokens=100, messages=HELLO)
    for system in (LONG_SYSTEM, LONG_SYSTEM):  # a cache write, then a cache read
        async with prefixed.messages.stream(model="balanced", max_tokens=100, system=system, messages=HELLO) as s:
            await s.get_final_message()
    emulator.state.faults.set(SONNET, Fault(status=503, times=2))
    await sdk.messages.create(model="quality", max_tokens=100, messages=HELLO)  # answered by the fallback
    with pytest.raises(anthropic.NotFoundError):  # refused before any model: a row, and no spend
        await sdk.messages.create(model="missing", max_tokens=100, messages=HELLO)
    await proxy.client().chat.completions.create(model="cheap", messages=HELLO)

    rows = await settled(proxy)
    assert booked_nano(rows) == billed_nano(emulator)
    (refused,) = [r for r in rows if r.status != 200]
    assert (refused.api, refused.status, refused.cost_usd, refused.generation_id) == ("messages", 404, 0.0, None)
    by_api = {api: [r for r in rows if r.api == api and r.status == 200] for api in ("messages", "chat")}
    assert [len(group) for group in by_api.values()] == [4, 1] and len(rows) == 6
    assert any(r.cached_tokens for r in by_api["messages"]) and any(r.cache_write_tokens for r in by_api["messages"])
    bills = emulator.state.bills
    spent = {api: sum(bills[r.generation_id].cost for r in group) for api, group in by_api.items()}

    report = await report_json(config, ledger, "--period", "day", "--by", "api")
    groups = {row["group"]: row for row in report["rows"]}
    assert groups.keys() == {"messages", "chat"}
    for api, cost in spent.items():
        assert to_nano(groups[api]["cost_usd"]) == pytest.approx(to_nano(cost), abs=len(by_api[api]))
        assert groups[api]["requests"] == len(by_api[api]) + (api == "messages")  # the refusal too
        assert groups[api]["prompt_tokens"] == sum(bills[r.generation_id].prompt_tokens for r in by_api[api])

    metrics = proxy.app[METRICS].registry

    def total(name: str, **labels: str) -> float:
        """A metric summed over every series with these labels."""
        return sum(
            sample.value
            for family in metrics.collect()
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    assert total("orproxy_requests_total", virtual_model="quality", model=SONNET, status="200", api="messages") == 1
    assert total("orproxy_requests_total", virtual_model="unknown", status="404", api="messages") == 1
    assert total("orproxy_requests_total", api="messages") == 5 and total("orproxy_requests_total", api="chat") == 1
    for api, cost in spent.items():
        assert total("orproxy_cost_usd_total", api=api) == pytest.approx(cost, abs=NANO)
        prompt = sum(r.prompt_tokens for r in by_api[api])
        assert total("orproxy_tokens_total", kind="prompt", api=api) == prompt
    assert total("orproxy_request_duration_seconds_count", api="messages") == 5
