"""The access log cannot be forged or flooded by what a client sends."""

from __future__ import annotations

import logging

import pytest

from proxy.config import parse_config
from proxy.core.budget import SpendCounters
from proxy.core.policy import Policy
from proxy.core.pricing import Catalogue
from proxy.core.record import RequestRecord
from proxy.money.accounting import log_access
from tests.support.gateway import proxy_config_text


@pytest.fixture
def policy() -> Policy:
    config = parse_config(proxy_config_text("http://127.0.0.1:9"))
    return Policy.build(config, Catalogue({}), {}, SpendCounters("UTC", 0.0))


def line_for(caplog, policy: Policy, model: str, request_id: str = "req-1") -> str:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="orproxy.access"):
        log_access(RequestRecord(request_id, 0.0, model, None, False, status=404), policy)
    [record] = caplog.records
    return record.getMessage()


@pytest.mark.parametrize(
    "model",
    [
        "cheap\n2026-11-25 12:00:00 INFO orproxy.access: forged -> gpt-4 status=200",
        "cheap\r\x1b[2Kforged",
        "cheap -> anthropic/claude status=200 cost=0.000000(upstream)",
        "ch\u2028eap",
    ],
)
def test_a_model_name_cannot_forge_a_line_or_a_field(caplog, policy, model):
    line = line_for(caplog, policy, model)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u2028" not in line
    assert line.count(" -> ") == 1 and line.count(" status=") == 1  # the fields are the proxy's own


def test_a_huge_model_name_makes_a_short_line(caplog, policy):
    line = line_for(caplog, policy, "x" * 5_000_000)
    assert len(line) < 400 and "…" in line


def test_an_ordinary_line_is_unchanged(caplog, policy):
    line = line_for(caplog, policy, "anthropic/claude-3-haiku")
    assert line.startswith("req-1 anthropic/claude-3-haiku -> - status=404 attempts=0")
