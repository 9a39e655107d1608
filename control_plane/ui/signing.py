"""Signed, expiring tokens — billing links, session cookies, form (CSRF) tokens — as
`payload.signature`, HMAC-SHA256 under a key derived from BILLING_LINK_SECRET for each
purpose, so a token made for one purpose is worth nothing for another."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import datetime
from typing import Any


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    def __init__(self, secret: str) -> None:
        if len(secret) < 32:
            raise ValueError("the signing secret must be at least 32 characters")
        self._secret = secret.encode()

    def _key(self, purpose: str) -> bytes:
        return hmac.new(self._secret, f"billing-platform/{purpose}".encode(), "sha256").digest()

    def sign(self, purpose: str, payload: dict[str, Any], expires_at: datetime) -> str:
        body = _b64(
            json.dumps(
                {"p": payload, "exp": int(expires_at.timestamp())}, separators=(",", ":")
            ).encode()
        )
        mac = hmac.new(self._key(purpose), body.encode(), hashlib.sha256).digest()
        return f"{body}.{_b64(mac)}"

    def verify(self, purpose: str, token: str | None, now: datetime) -> dict[str, Any] | None:
        """The payload of a token signed for `purpose` that has not expired; else None."""
        if not token or token.count(".") != 1 or len(token) > 4096:
            return None
        body, mac = token.split(".")
        expected = hmac.new(self._key(purpose), body.encode(), hashlib.sha256).digest()
        try:
            if not hmac.compare_digest(_unb64(mac), expected):
                return None
            data = json.loads(_unb64(body))
        except (ValueError, TypeError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("p"), dict):
            return None
        if not isinstance(data.get("exp"), int) or data["exp"] <= now.timestamp():
            return None
        payload: dict[str, Any] = data["p"]
        return payload
