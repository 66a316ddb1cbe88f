"""Client keys for the proxy itself. Only SHA-256 digests are held in memory for
comparison; a presented key is hashed and compared in constant time against
every configured digest, so neither the match nor its position leaks by timing."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.config import ProxyKey
from proxy.core.errors import Forbidden, Unauthorized

log = logging.getLogger("orproxy")


@dataclass(frozen=True, slots=True)
class ClientKey:
    name: str | None  # None: the proxy is open (no keys configured)
    models: frozenset[str] | None = None  # virtual models this key may use; None = all

    def check_model(self, model: str) -> None:
        if self.models is not None and model not in self.models:
            raise Forbidden(
                f"The key '{self.name}' may not use the model '{model}'. Allowed: {', '.join(sorted(self.models))}.",
                param="model",
            )


OPEN = ClientKey(None)


class KeyRing:
    def __init__(self, keys: tuple[ProxyKey, ...], env: Mapping[str, str]) -> None:
        self.enabled = bool(keys)
        self._entries: list[tuple[bytes, ClientKey]] = []
        for key in keys:
            if key.key_sha256:
                digest = bytes.fromhex(key.key_sha256)
            else:
                secret = env.get(key.key_env or "", "")
                if not secret:
                    log.warning(
                        "key %r: the environment variable %s is not set; that key cannot be used", key.name, key.key_env
                    )
                    continue
                digest = hashlib.sha256(secret.encode()).digest()
            self._entries.append((digest, ClientKey(key.name, frozenset(key.models) if key.models else None)))

    def authenticate(self, authorization: str | None) -> ClientKey:
        if not self.enabled:
            return OPEN
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:  # auth schemes are case-insensitive (RFC 7235)
            raise Unauthorized(
                "Missing API key: send `Authorization: Bearer <your proxy key>`.", code="missing_api_key"
            )
        # surrogateescape: the bytes the client sent, even when they are not UTF-8 (aiohttp keeps them so)
        presented = hashlib.sha256(token.encode(errors="surrogateescape")).digest()
        found = None
        for digest, client in self._entries:
            if hmac.compare_digest(presented, digest) and found is None:
                found = client
        if found is None:
            raise Unauthorized("Incorrect API key provided. Ask the proxy's operator for a valid key.")
        return found


def bearer_matches(authorization: str | None, secret: str) -> bool:
    """`Authorization: Bearer <secret>`, compared in constant time (scheme case-insensitive)."""
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(errors="surrogateescape"), secret.encode())
