"""The layout's `registry:` value: 'memory' (in-process, the default) or `redis://HOST[:PORT][/DB][?ttl_s=S]`.

Pure parsing (no redis import), so the layout can reject junk with a message naming `registry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

DEFAULT_REDIS_PORT = 6379
DEFAULT_TTL_S = 3.0  # a worker silent this long stops getting work; it beats every TTL / 3


@dataclass(frozen=True, slots=True)
class RegistrySpec:
    """A parsed `registry:`; `url` is what redis-py connects to (no Tandem query options)."""

    kind: str  # "memory" or "redis"
    url: str = ""
    host: str = ""
    port: int = DEFAULT_REDIS_PORT
    db: int = 0
    ttl_s: float = DEFAULT_TTL_S


def parse_registry(value: str) -> RegistrySpec:
    """Raises ValueError saying what is wrong (the layout adds the field name)."""
    if value == "memory":
        return RegistrySpec("memory")
    expect = "expected 'memory' or redis://HOST[:PORT][/DB][?ttl_s=SECONDS]"
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"{expect}, got {value!r}")
    try:
        port = parts.port or DEFAULT_REDIS_PORT
    except ValueError:
        raise ValueError(f"{expect}: bad port in {value!r}") from None
    if not parts.hostname:
        raise ValueError(f"{expect}: no host in {value!r}")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"{expect}: the database must be a number, got {path!r}")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"ttl_s"})
    if unknown:
        raise ValueError(f"{expect}: unknown option(s) {', '.join(unknown)}")
    ttl = DEFAULT_TTL_S
    if "ttl_s" in query:
        try:
            ttl = float(query["ttl_s"][-1])
        except ValueError:
            ttl = -1.0
        if not ttl > 0:
            raise ValueError(f"{expect}: ttl_s must be a number of seconds > 0, got {query['ttl_s'][-1]!r}")
    db = int(path or 0)
    netloc = parts.netloc
    return RegistrySpec("redis", f"{parts.scheme}://{netloc}/{db}", parts.hostname, port, db, ttl)
