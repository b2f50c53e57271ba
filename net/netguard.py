"""Safe fetching: which addresses a download may connect to, checked on the address actually connected.

The policy is applied inside the connection (after DNS resolution, for every redirect hop), so a URL
whose text looks public but resolves to 10.0.0.1, a redirect to 169.254.169.254, a decimal or hex IP
spelling, or an IPv4-mapped IPv6 address are all caught. Allow-listed endpoints (HOST or HOST:PORT,
e.g. a local test server) pass.

`refuse_non_loopback()` is a separate, lower layer: it patches socket connect in this process so no
packet can leave 127.0.0.0/8 and ::1 whatever the policy says. Tests and air-gapped runs use it, so a
broken policy fails loudly instead of sending packets.
"""
from __future__ import annotations

import ipaddress
import socket
import threading

BLOCKED_MARK = "blocked_address"

# Ranges that Python's ipaddress flags do not all cover on every version: be explicit.
_EXTRA_BLOCKED = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "192.0.0.0/24", "198.18.0.0/15", "240.0.0.0/4",
    "fc00::/7", "fe80::/10", "64:ff9b::/96",
)]


class BlockedAddress(OSError):
    pass


def why_blocked(ip: str) -> str | None:
    """The reason an IP is not a public unicast address, or None if it is."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if str(addr) == "169.254.169.254" or str(addr) == "fd00:ec2::254":
        return "cloud metadata"
    for flag in ("is_unspecified", "is_loopback", "is_link_local", "is_multicast", "is_private", "is_reserved"):
        if getattr(addr, flag):
            return flag[3:].replace("_", "-")
    if any(addr in net for net in _EXTRA_BLOCKED if net.version == addr.version):
        return "special-purpose"
    return None


class AddressPolicy:
    """Public unicast addresses pass; others only when allow-listed as HOST or HOST:PORT."""

    def __init__(self, allow: list[str] = ()):
        self.allow: set[tuple[str, int | None]] = set()
        for entry in allow:
            host, port = _split_host_port(entry)
            for ip in _resolve_all(host):
                self.allow.add((ip, port))

    def check(self, ip: str, port: int) -> str | None:
        """None if a connection to (ip, port) is allowed, else why not."""
        ip = _normal_ip(ip)
        if (ip, port) in self.allow or (ip, None) in self.allow:
            return None
        return why_blocked(ip)

    def create_connection(self, address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, **_):
        """socket.create_connection that connects only to addresses the policy allows, and checks the
        peer actually connected (the IP is resolved once and connected to directly: no rebinding gap)."""
        host, port = address[0], int(address[1])
        errors = []
        try:
            infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise OSError(f"cannot resolve {host}: {e}") from None
        for family, kind, proto, _, sockaddr in infos:
            reason = self.check(sockaddr[0], port)
            if reason:
                errors.append(f"{host} -> {sockaddr[0]} ({reason})")
                continue
            sock = socket.socket(family, kind, proto)
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                peer = sock.getpeername()
                reason = self.check(peer[0], peer[1])
                if reason:
                    raise BlockedAddress(f"{BLOCKED_MARK}: connected peer {peer[0]} ({reason})")
                return sock
            except BaseException:
                sock.close()
                raise
        raise BlockedAddress(f"{BLOCKED_MARK}: {'; '.join(errors)} not allowed "
                             f"(pass --allow-host HOST:PORT to permit a specific endpoint)")


def _split_host_port(entry: str) -> tuple[str, int | None]:
    """HOST, HOST:PORT, [IPv6] or [IPv6]:PORT; ValueError naming the entry otherwise."""
    text = str(entry).strip()
    port = None
    if text.startswith("["):  # [::1]:8080
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            host = ""
        port = rest[1:] if rest.startswith(":") else None
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host = text
    if not host or any(c.isspace() or c in "/@?#" for c in host) or (
            port is not None and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"allow-host {entry!r} is not HOST, HOST:PORT or [IPv6]:PORT with a port from 1 to 65535")
    return host, None if port is None else int(port)


def check_allow_list(entries) -> None:
    """Parse and resolve every allow-list entry now (on the driver), so a typo is one line before any
    work rather than an error inside every download task."""
    AddressPolicy(list(entries))


def _resolve_all(host: str) -> set[str]:
    try:
        return {_normal_ip(info[4][0]) for info in socket.getaddrinfo(host, None, 0, socket.SOCK_STREAM)}
    except socket.gaierror as e:
        raise ValueError(f"allow-host {host}: cannot resolve: {e}") from None


def _normal_ip(ip: str) -> str:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


# --- the last line: no packet leaves loopback ------------------------------------------------------
_patch_lock = threading.Lock()
_original_connect = socket.socket.connect
_original_connect_ex = socket.socket.connect_ex
_original_getaddrinfo = socket.getaddrinfo
refused_attempts: list[tuple] = []  # what a broken policy tried to reach, for tests to assert on


def _is_loopback_sockaddr(sock: socket.socket, address) -> bool:
    if sock.family == socket.AF_UNIX:
        return True
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        return ipaddress.ip_address(_normal_ip(address[0])).is_loopback
    except ValueError:
        return False  # a name, not an address: refuse rather than resolve here


def _guarded_connect(self, address):
    if not _is_loopback_sockaddr(self, address):
        refused_attempts.append(tuple(address) if isinstance(address, tuple) else (address,))
        raise ConnectionRefusedError(f"loopback-only mode refused a connection to {address}")
    return _original_connect(self, address)


def _guarded_connect_ex(self, address):
    if not _is_loopback_sockaddr(self, address):
        refused_attempts.append(tuple(address) if isinstance(address, tuple) else (address,))
        return 111  # ECONNREFUSED
    return _original_connect_ex(self, address)


def _numeric_getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
    # A DNS query is a packet too: only numeric hosts and localhost (from /etc/hosts) resolve.
    if host is not None and str(host).lower() not in ("localhost", "localhost.localdomain"):
        flags |= socket.AI_NUMERICHOST
    return _original_getaddrinfo(host, port, family, type, proto, flags)


def refuse_non_loopback() -> None:
    """Make every socket connect in this process refuse non-loopback addresses, and name lookups
    other than numeric hosts and localhost fail (idempotent)."""
    with _patch_lock:
        socket.socket.connect = _guarded_connect
        socket.socket.connect_ex = _guarded_connect_ex
        socket.getaddrinfo = _numeric_getaddrinfo


def allow_any_connect() -> None:
    with _patch_lock:
        socket.socket.connect = _original_connect
        socket.socket.connect_ex = _original_connect_ex
        socket.getaddrinfo = _original_getaddrinfo
