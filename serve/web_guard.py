"""Which requests `cxr serve` answers at all: a Host allow-list, and no cross-site request that posts.

- **Host** (against DNS rebinding, where a foreign name resolves to this server): a request whose `Host` is not
  in the allow-list gets 421. `allowed_hosts` builds the default list from the bound address: that address,
  and for a loopback bind `localhost`, `127.0.0.1` and `::1`; a wildcard bind (0.0.0.0, ::) also takes any IP
  address, since a rebinding page names the server by a domain name. `--allowed-host` adds names (`*`: any).
- **Cross-site posts** (against a foreign page that makes a browser POST here): a POST whose `Origin` is neither
  this server (the request's own `Host`, port included) nor a CORS origin, or that a browser marks
  `Sec-Fetch-Site: cross-site`, gets 403. `POST /reload` also refuses a body (a form or `text/plain` post) with 415.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from fastapi import Request

from serve.request_parsing import JSON

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")
UNSAFE = ("POST", "PUT", "PATCH", "DELETE")


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def allowed_hosts(bind: str, extra: Iterable[str] = ()) -> list[str]:
    """The default allow-list for a server bound to `bind`, plus `extra` (names or addresses; `*` for any)."""
    bind = bind.strip("[]").lower()
    out = [bind] if bind not in WILDCARDS else ["*ip"]
    ip = _ip(bind)
    if bind in WILDCARDS or bind == "localhost" or (ip is not None and ip.is_loopback):
        out += list(LOOPBACK_NAMES)
    out += [h.strip().strip("[]").lower() for h in extra if h.strip()]
    return list(dict.fromkeys(out))


def host_of(value: str) -> str:
    """The host part of a Host header or an origin's authority (no port, no brackets, lower case)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value[1:]
    if value.count(":") == 1:
        value = value.split(":")[0]
    return value


def host_allowed(host: str, allowed: list[str]) -> bool:
    """True when `host` (no port) is in `allowed`, or `allowed` holds `*`, or `*ip` and `host` is an address."""
    return "*" in allowed or host in allowed or ("*ip" in allowed and _ip(host) is not None)


class WebGuard:
    """The HTTP middleware: `allowed` hosts (None: every Host is answered) and the CORS `origins`."""

    def __init__(self, allowed: list[str] | None, origins: Iterable[str] = ()):
        self.allowed = allowed
        self.origins = {o.rstrip("/").lower() for o in origins}

    def refusal(self, request: Request) -> JSON | None:
        """The response that refuses `request`, or None to answer it."""
        host_header = request.headers.get("host", "")
        host = host_of(host_header)
        if self.allowed is not None and not host_allowed(host, self.allowed):
            shown = host_header[:100] or "(none)"
            message = f"Host {shown!r} is not served here; start the server with --allowed-host {host or 'NAME'}"
            return JSON({"detail": message}, status_code=421)
        if request.method not in UNSAFE:
            return None
        origin = request.headers.get("origin")
        if origin is not None and not self._origin_ok(origin, host_header):
            return JSON({"detail": f"cross-site request from {origin[:100]!r} refused"}, status_code=403)
        if origin is None and request.headers.get("sec-fetch-site", "").lower() == "cross-site":
            return JSON({"detail": "cross-site request refused"}, status_code=403)
        return None

    def _origin_ok(self, origin: str, host_header: str) -> bool:
        if origin.rstrip("/").lower() in self.origins:
            return True
        authority = urlsplit(origin).netloc.lower()
        return bool(authority) and authority == host_header.strip().lower()  # the same origin

    async def __call__(self, request: Request, call_next):
        refused = self.refusal(request)
        return refused if refused is not None else await call_next(request)
