"""Who is calling the API: named bearer tokens with a role, and signed dashboard sessions.

Tokens come from ``LIGHTBOX_API_TOKENS`` (a JSON list of ``{name, token, role}``) plus
``LIGHTBOX_API_TOKEN`` (one operator token named ``default``). Roles: ``read`` may query,
``operator`` may also retry, cancel, promote and store (STOW-RS). Every presented token is
compared with every configured one in constant time (``hmac.compare_digest``), so neither a
match nor its position leaks through timing.

The dashboard signs in with a token once and then carries a session cookie: the token's *name*,
role, a CSRF secret and an expiry, signed with HMAC-SHA256 under a key made at start (a restart
signs everyone out, and so does removing a token from the configuration, which takes a
restart). The cookie never holds the token, and each request checks that the session's token
name still has that role.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from lightbox.errors import ConfigurationError
from lightbox.settings import Settings

ROLES = ("read", "operator")
SESSION_COOKIE = "lightbox_session"
SESSION_SECONDS = 8 * 3600


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    csrf: str = ""

    def may(self, role: str) -> bool:
        return role == "read" or self.role == "operator"


@dataclass(frozen=True)
class ApiToken:
    name: str
    token: bytes
    role: str


def load_tokens(settings: Settings) -> list[ApiToken]:
    """The configured tokens; a malformed entry is a configuration error naming the variable."""
    tokens: list[ApiToken] = []
    for i, entry in enumerate(settings.api_tokens):
        name, token, role = (entry.get("name"), entry.get("token"), entry.get("role", "read"))
        if not isinstance(name, str) or not name or not isinstance(token, str) or len(token) < 8:
            raise ConfigurationError(f"LIGHTBOX_API_TOKENS[{i}]: needs a name and a token of "
                                     "at least 8 characters")
        if role not in ROLES:
            raise ConfigurationError(f"LIGHTBOX_API_TOKENS[{i}]: role must be one of "
                                     f"{', '.join(ROLES)}, not {role!r}")
        tokens.append(ApiToken(name, token.encode(), role))
    if settings.api_token:
        tokens.append(ApiToken("default", settings.api_token.encode(), "operator"))
    names = [t.name for t in tokens]
    if len(set(names)) != len(names):
        raise ConfigurationError("LIGHTBOX_API_TOKENS: token names must be unique")
    if not tokens:
        raise ConfigurationError("LIGHTBOX_API_TOKEN or LIGHTBOX_API_TOKENS is required for "
                                 "the API")
    return tokens


class Authenticator:
    """Token checks and session cookies for one API process."""

    def __init__(self, tokens: list[ApiToken], key: bytes | None = None) -> None:
        self.tokens = tokens
        self._key = key or secrets.token_bytes(32)

    def by_token(self, presented: str) -> Principal | None:
        found: ApiToken | None = None
        candidate = presented.strip().encode()
        for token in self.tokens:  # no early exit: every token is compared
            if hmac.compare_digest(candidate, token.token):
                found = token
        return None if found is None else Principal(found.name, found.role)

    def by_bearer(self, header: str) -> Principal | None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value:
            return None
        return self.by_token(value)

    def _sign(self, payload: bytes) -> str:
        return hmac.new(self._key, payload, hashlib.sha256).hexdigest()

    def make_session(self, principal: Principal) -> str:
        body = json.dumps({"n": principal.name, "r": principal.role,
                           "c": secrets.token_urlsafe(24),
                           "e": int(time.time()) + SESSION_SECONDS}).encode()
        encoded = base64.urlsafe_b64encode(body).decode()
        return f"{encoded}.{self._sign(encoded.encode())}"

    def by_session(self, cookie: str | None) -> Principal | None:
        if not cookie or "." not in cookie:
            return None
        encoded, _, signature = cookie.rpartition(".")
        if not hmac.compare_digest(signature, self._sign(encoded.encode())):
            return None
        try:
            body = json.loads(base64.urlsafe_b64decode(encoded))
            name, role, csrf, expires = body["n"], body["r"], body["c"], int(body["e"])
        except (ValueError, KeyError, TypeError):
            return None
        if expires < time.time():
            return None
        current = {t.name: t.role for t in self.tokens}
        if current.get(name) != role:  # token removed or its role changed
            return None
        return Principal(name, role, csrf)
