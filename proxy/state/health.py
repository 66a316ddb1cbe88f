"""Whether the shared state (Redis) answers, and what the proxy does while it does not.

Told of every failed and every successful call; says it once in the log when Redis goes away and
once when it is back (never per request). `on_state_error` decides the requests in between:
`fail_closed` answers them 503 naming Redis and the setting, `local` serves them on this process's
own state. The metrics read `up` and `errors`."""

from __future__ import annotations

import logging

from proxy.core.errors import ServiceUnavailable

log = logging.getLogger("orproxy")


class StateHealth:
    def __init__(self, where: str, on_error: str) -> None:
        self.where = where  # the Redis URL without its password, for messages
        self.on_error = on_error
        self.up = True
        self.errors = 0  # calls that failed: orproxy_state_errors_total
        self.last_error = ""
        self.down_since: float | None = None

    @property
    def local_fallback(self) -> bool:
        return self.on_error == "local"

    def failed(self, exc: BaseException, now: float) -> None:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.up:
            self.up, self.down_since = False, now
            then = (
                "serving from this process's own state until it is back (state.on_state_error: local)"
                if self.local_fallback
                else "answering requests 503 until it is back (state.on_state_error: fail_closed)"
            )
            log.error("shared state: Redis at %s is unreachable (%s); %s", self.where, self.last_error, then)

    def recovered(self) -> None:
        if not self.up:
            log.warning("shared state: Redis at %s is back; counters re-seeded from the ledger", self.where)
        self.up, self.down_since = True, None

    def refusal(self) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"Shared state is unavailable: Redis at {self.where} does not answer ({self.last_error}), and "
            "state.on_state_error is fail_closed, so no budget can be checked. Retry shortly; an operator can "
            "set state.on_state_error: local to serve on each replica's own state meanwhile.",
            code="state_unavailable",
            retry_after=1.0,
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "up": self.up,
            "url": self.where,
            "on_state_error": self.on_error,
            "errors": self.errors,
            "last_error": self.last_error or None,
            "down_since": self.down_since,
        }
