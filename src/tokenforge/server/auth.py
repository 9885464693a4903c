"""API keys: who may use the server, and which tenant each request belongs to (its KV cache salt and quota).

`--api-key KEY` admits one key; `--api-keys FILE` one tenant per line:

    KEY                       a tenant named after the key's digest, default quota
    KEY  NAME                 a named tenant
    KEY  NAME  QUOTA          ... with its own KV quota in each lower tier (e.g. 2GiB)

Blank lines and lines starting with '#' are skipped. Every route but `/health` then needs
`Authorization: Bearer KEY`; anything else is a 401 in OpenAI's error shape. A tenant's requests carry its
cache salt, so tenants never share a cached KV block in any tier (one cannot time another's prompts), and
its quota bounds what it keeps in host memory and on disk. Keys are compared as digests in constant time
against every key, and are never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from tokenforge.config import ConfigError, parse_size
from tokenforge.server.protocol import error_body

OPEN_PATHS = frozenset({"/health"})


@dataclass(frozen=True)
class Tenant:
    name: str
    salt: str | None  # enters the first KV block's key of every request (None: the shared, unsalted cache)
    quota: int | None = None  # bytes per lower tier; None: the server's --kv-tenant-quota


class APIKeys:
    def __init__(self, tenants: dict[str, Tenant]):
        if not tenants:
            raise ConfigError("no API keys given")
        self._tenants = [(_digest(key), tenant) for key, tenant in tenants.items()]

    @classmethod
    def from_args(cls, api_key: str | None, api_keys_file: str | None) -> APIKeys | None:
        tenants = parse_keys_file(api_keys_file) if api_keys_file else {}
        if api_key:
            tenants.setdefault(api_key, Tenant("default", None))
        return cls(tenants) if tenants else None

    def tenant(self, presented: str) -> Tenant | None:
        """The key's tenant, or None. Every key is compared, so the time taken says nothing about which
        (or how much of one) matched."""
        digest, found = _digest(presented), None
        for key_digest, tenant in self._tenants:
            if hmac.compare_digest(digest, key_digest):
                found = tenant
        return found

    def quotas(self) -> dict[str, int]:
        """Tenant salt -> its own KV quota, for the engine's tiers."""
        return {t.salt: t.quota for _, t in self._tenants if t.salt is not None and t.quota is not None}


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def parse_keys_file(path: str) -> dict[str, Tenant]:
    """KEY [NAME [QUOTA]] per line; errors name the file and line, never the key."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"--api-keys {path}: cannot read it ({e.strerror})") from None
    tenants: dict[str, Tenant] = {}
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        where = f"--api-keys {path}, line {number}"
        if len(fields) > 3:
            raise ConfigError(f"{where}: expected KEY [NAME [QUOTA]], got {len(fields)} fields")
        key = fields[0]
        name = fields[1] if len(fields) > 1 else "key-" + _digest(key).hex()[:12]
        quota = parse_size(fields[2]) if len(fields) > 2 else None
        if key in tenants:
            raise ConfigError(f"{where}: this key is already listed for tenant {tenants[key].name!r}")
        if any(t.name == name for t in tenants.values()):
            raise ConfigError(f"{where}: tenant name {name!r} is used twice; names must differ")
        tenants[key] = Tenant(name, f"tenant:{name}", quota)
    return tenants


class APIKeyAuth:
    """ASGI middleware: a request to any route but /health needs a valid bearer key. The tenant found is put
    in the request's state (`request.state.tenant`)."""

    def __init__(self, app, keys: APIKeys):
        self.app = app
        self.keys = keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        tenant = self._tenant(scope)
        if tenant is None:
            await _unauthorized(send)
            return
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)

    def _tenant(self, scope) -> Tenant | None:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        return self.keys.tenant(key.strip())


async def _unauthorized(send) -> None:
    body = json.dumps(error_body("a valid API key is required: send it as 'Authorization: Bearer KEY'",
                                 "invalid_request_error", code="invalid_api_key")).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"www-authenticate", b"Bearer")]})
    await send({"type": "http.response.body", "body": body})
