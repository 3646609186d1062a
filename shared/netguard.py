"""Outbound requests to operator-given URLs (webhooks, suspect endpoints) are guarded against SSRF."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit


class UnsafeUrlError(ValueError):
    """The URL may not be contacted; the message says why and how to allow it."""


def parse_host_list(value: str | Iterable[str] | None) -> frozenset[str]:
    """A comma-separated allow-list (e.g. "127.0.0.1,localhost") as a set of lower-case names."""
    if value is None:
        return frozenset()
    items = value.split(",") if isinstance(value, str) else value
    return frozenset(item.strip().lower() for item in items if item.strip())


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def check_outbound_url(url: str, allowed_hosts: frozenset[str], setting_name: str) -> list[str]:
    """Refuse non-HTTP URLs and hosts resolving to private, loopback, link-local or metadata addresses.

    Hosts named in the allow-list (by name or literal address) are let through. Returns the resolved
    addresses so callers can log them.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UnsafeUrlError(f"only http and https URLs are allowed, not {parts.scheme or 'none'!r}")
    host = (parts.hostname or "").lower()
    if not host:
        raise UnsafeUrlError("the URL has no host")
    if parts.username or parts.password:
        raise UnsafeUrlError("credentials in the URL are not allowed; use headers")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise UnsafeUrlError(f"invalid port in URL: {exc}") from exc
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UnsafeUrlError(f"cannot resolve host {host!r}: {exc}") from exc
    addresses = sorted({str(info[4][0]) for info in infos})
    if host in allowed_hosts:
        return addresses
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if text.lower() in allowed_hosts:
            continue
        if not _is_public(address):
            raise UnsafeUrlError(
                f"{host} resolves to {text}, a private, loopback, link-local or reserved address; "
                f"add the host to {setting_name} to allow it"
            )
    return addresses
