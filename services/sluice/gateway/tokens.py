"""Page tokens: opaque to the client, tamper-evident, bound to the request they page.

A token is ``base64url(offset "." fingerprint) "." base64url(HMAC-SHA256[:16])``. The first
key of the list signs and every key verifies, so keys rotate without breaking the pages a
client holds: add the new key first, keep the old one second until its tokens have aged
out, then drop it. Every gateway replica must be given the same keys
(``SLUICE_GATEWAY_PAGE_TOKEN_KEYS``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Sequence

from sluice.core.errors import InvalidArgument

log = logging.getLogger(__name__)

_PAYLOAD = re.compile(r"(0|[1-9][0-9]{0,9})\.([0-9a-f]{12})")
MAX_TOKEN_CHARS = 128
_MAC_BYTES = 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PageTokens:
    """Signs and verifies page tokens with a list of keys (the first signs)."""

    def __init__(self, keys: Sequence[bytes], max_offset: int) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        self._keys = [bytes(k) for k in keys]
        self.max_offset = max_offset

    @classmethod
    def from_settings(cls, keys: Sequence[str], max_offset: int) -> PageTokens:
        if not keys:
            log.warning(
                "no SLUICE_GATEWAY_PAGE_TOKEN_KEYS: page tokens are signed with a random key "
                "that dies with this process and is not shared with other replicas"
            )
            return cls([secrets.token_bytes(32)], max_offset)
        return cls([k.encode() for k in keys], max_offset)

    def _mac(self, key: bytes, payload: bytes) -> bytes:
        return hmac.new(key, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, offset: int, fingerprint: str) -> str:
        payload = f"{offset}.{fingerprint}".encode()
        return f"{_b64(payload)}.{_b64(self._mac(self._keys[0], payload))}"

    def decode(self, token: str, fingerprint: str) -> int:
        """The offset a token holds; INVALID_ARGUMENT (``page_token``) for any other token."""
        if not token:
            return 0
        payload = self._verified(token)
        match = _PAYLOAD.fullmatch(payload.decode("ascii", "replace"))
        if match is None:
            raise InvalidArgument("malformed page token", field_path="page_token")
        offset, bound_to = int(match[1]), match[2]
        if not hmac.compare_digest(bound_to, fingerprint):
            raise InvalidArgument(
                "page token belongs to a different request", field_path="page_token"
            )
        if offset > self.max_offset:
            raise InvalidArgument("page token is out of range", field_path="page_token")
        return offset

    def _verified(self, token: str) -> bytes:
        if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
            raise InvalidArgument("malformed page token", field_path="page_token")
        body, mac = token.split(".")
        try:
            payload, tag = _unb64(body), _unb64(mac)
        except (binascii.Error, ValueError) as err:
            raise InvalidArgument("malformed page token", field_path="page_token") from err
        if not any(hmac.compare_digest(self._mac(k, payload), tag) for k in self._keys):
            raise InvalidArgument(
                "page token was not issued by this shop (or its key was retired)",
                field_path="page_token",
            )
        return payload
