"""API keys: `Authorization: Bearer KEY` on HTTP, metadata `authorization: Bearer KEY` on gRPC.

With API keys configured every route and RPC but health needs one of them (or an admin key); admin
operations (rebalance, scale) need an admin key, and are refused on a server started without one.
Keys are compared in constant time, against every configured key.
"""

from __future__ import annotations

import hmac

from .errors import RequestError


def bearer_token(header: str | None) -> str | None:
    """The KEY of "Bearer KEY" (scheme case-insensitive), None if absent or another scheme."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, keys: list[str]) -> bool:
    found = False
    for key in keys:  # no early exit: the time does not tell which key, or how much, matched
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


class Authenticator:
    def __init__(self, api_keys: list[str], admin_api_keys: list[str]) -> None:
        self.api_keys, self.admin_api_keys = list(api_keys), list(admin_api_keys)

    def check(self, authorization: str | None, admin: bool = False) -> None:
        """Raises RequestError: unauthenticated (401) without a valid key where one is needed,
        permission_denied (403) for an admin operation without an admin key."""
        token = bearer_token(authorization)
        if admin:
            if not self.admin_api_keys:
                raise RequestError("permission_denied", "admin operations are disabled on this server: "
                                                        "start it with --admin-api-key to allow them")
            if token is None or not _matches(token, self.admin_api_keys):
                raise RequestError("permission_denied", "this operation needs an admin API key "
                                                        "(Authorization: Bearer <admin key>)")
            return
        if not self.api_keys:
            return
        if token is None:
            raise RequestError("unauthenticated", "missing API key: send 'Authorization: Bearer <key>'")
        if not (_matches(token, self.api_keys) | _matches(token, self.admin_api_keys)):
            raise RequestError("unauthenticated", "invalid API key")

    def check_grpc(self, grpc_context) -> None:
        metadata = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
        self.check(metadata.get("authorization"))
