"""Opening a dataset URL only towards public hosts, over https, within a deadline.

A job's URL is fetched by the worker itself, from inside the provider's network:
without rules it could reach the worker's loopback services, the cloud metadata
address or private hosts beside it. So:

- every connection resolves the host itself and connects only to an address that
  passed `address_problem` (the address actually connected to is the one checked,
  so a name that resolves differently a second time gains nothing); the operator
  may name private hosts that are allowed anyway;
- a redirect must stay on https, goes through the same check for its own host, and
  there are at most MAX_REDIRECTS of them;
- proxies from the environment are not used (through a proxy the worker would not
  see the address the proxy connects to);
- every read and the TLS handshake get at most the time left before the download's
  deadline, so a server sending one byte at a time cannot hold the job forever.

Pure standard library: `http.client` and `urllib.request` with a connection class
and handlers of their own.
"""

from __future__ import annotations

import errno
import http.client
import ipaddress
import socket
import ssl
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

MAX_REDIRECTS = 5
READ_TIMEOUT_S = 60.0  # the longest wait for one read, however far the deadline is

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
CGNAT = ipaddress.ip_network("100.64.0.0/10")
RFC1918 = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class Refused(Exception):
    """A URL the rules do not let the worker open. `reason` names no query string."""

    def __init__(self, reason: str, operator_can_allow: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.operator_can_allow = operator_can_allow


class DeadlinePassed(TimeoutError):
    pass


def address_problem(ip: IPAddress) -> str | None:
    """Why the worker must not connect to `ip` ("a loopback address"), or None when it is public."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64 else None)
        if embedded is not None:  # ::ffff:a.b.c.d and 64:ff9b::a.b.c.d reach a.b.c.d
            return address_problem(embedded)
        if ip.sixtofour is not None and address_problem(ip.sixtofour):
            return f"a 6to4 address of {ip.sixtofour}, {address_problem(ip.sixtofour)}"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip in CGNAT:
        return "a shared (carrier-grade NAT) address"
    if any(ip in network for network in RFC1918):
        return "a private address"
    if ip.is_private or ip.is_reserved or getattr(ip, "is_site_local", False) or not ip.is_global:
        return "a special-purpose address, not a public one"
    return None


def host_allowed(host: str, port: int, allowed: frozenset[str]) -> bool:
    """Whether the operator allowed this host (any port) or this host and port."""
    host = host.lower().rstrip(".")
    shown = f"[{host}]" if ":" in host else host
    return host in allowed or shown in allowed or f"{shown}:{port}" in allowed


@dataclass
class Guard:
    """The rules of one download, and what happened so far (the URLs visited)."""

    allowed_hosts: frozenset[str] = frozenset()
    deadline: float = float("inf")  # time.monotonic() value
    visited: list[str] = field(default_factory=list)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self) -> float:
        """For the next blocking operation: a read's timeout, cut to the time left."""
        remaining = self.remaining()
        if remaining <= 0:
            raise DeadlinePassed("the download's deadline has passed")
        return min(READ_TIMEOUT_S, remaining)

    def vetted_addresses(self, host: str, port: int) -> list[tuple]:
        """getaddrinfo's answers for host:port that the rules let the worker connect to."""
        answers = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        if host_allowed(host, port, self.allowed_hosts):
            return answers
        vetted, refused = [], []
        for answer in answers:
            ip = ipaddress.ip_address(answer[4][0].split("%")[0])
            problem = address_problem(ip)
            if problem:
                refused.append((ip, problem))
            else:
                vetted.append(answer)
        if not vetted:
            ip, problem = refused[0]
            said = f"{ip} is {problem}" if _is_ip_literal(host) else f"{host} resolves to {ip}, {problem}"
            raise Refused(f"{said}; dataset URLs must reach public hosts", operator_can_allow=True)
        return vetted


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _DeadlineSSLSocket(ssl.SSLSocket):
    """An SSL socket whose every read waits at most until the guard's deadline."""

    guard: Guard | None = None

    def recv_into(self, buffer, nbytes=0, flags=0):
        if self.guard is not None:
            self.settimeout(self.guard.timeout())
        return super().recv_into(buffer, nbytes, flags)

    def recv(self, buflen=1024, flags=0):
        if self.guard is not None:
            self.settimeout(self.guard.timeout())
        return super().recv(buflen, flags)


class GuardedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPSConnection.connect, but to a vetted address and with the deadline on every wait.

    The certificate is still checked against the URL's host name (SNI and hostname
    verification use `self.host`), whatever address was connected to.
    """

    def __init__(self, host: str, port: int | None = None, *, guard: Guard, **kwargs):
        super().__init__(host, port, **kwargs)
        self.guard = guard

    def connect(self) -> None:
        if self._tunnel_host:
            raise Refused("a proxy was configured; dataset URLs are fetched directly")
        sys.audit("http.client.connect", self, self.host, self.port)
        last_error: OSError | None = None
        for family, kind, proto, _, address in self.guard.vetted_addresses(self.host, self.port):
            timeout = self.guard.timeout()
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(timeout)
                sock.connect(address)
            except OSError as exc:
                sock.close()
                last_error = exc
                continue
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:  # as http.client: some systems have no TCP_NODELAY
                if exc.errno != errno.ENOPROTOOPT:
                    sock.close()
                    raise
            try:
                sock.settimeout(self.guard.timeout())  # the whole handshake waits at most this long
                self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
            self.sock.guard = self.guard
            return
        raise last_error or OSError(f"could not connect to {self.host}")


class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, guard: Guard):
        context = ssl.create_default_context()
        context.set_alpn_protocols(["http/1.1"])
        context.sslsocket_class = _DeadlineSSLSocket
        super().__init__(context=context)
        self.guard = guard

    def https_open(self, req):
        return self.do_open(self._connection, req, context=self._context)

    def _connection(self, host: str, **kwargs) -> GuardedHTTPSConnection:
        return GuardedHTTPSConnection(host, guard=self.guard, **kwargs)


class GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Redirects only to https, at most MAX_REDIRECTS; each hop's host is checked when connecting."""

    max_repeats = max_redirections = MAX_REDIRECTS + 1  # the count below speaks first

    def __init__(self, guard: Guard):
        self.guard = guard

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri")
        if target:
            url = urljoin(req.full_url, target.strip())
            if urlsplit(url).scheme != "https":
                fp.close()
                raise Refused(f"it redirects to {url_for_humans(url)}, and redirects must stay on https")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if len(self.guard.visited) > MAX_REDIRECTS:
            fp.close()
            raise Refused(f"it redirects more than {MAX_REDIRECTS} times")
        self.guard.visited.append(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def open_url(url: str, guard: Guard):
    """The response for an https URL, opened under `guard`'s rules (raises Refused, OSError)."""
    if urlsplit(url).scheme != "https":
        raise Refused("only https URLs are fetched")
    guard.visited.append(url)
    opener = urllib.request.OpenerDirector()
    for handler in (
        GuardedHTTPSHandler(guard),
        GuardedRedirectHandler(guard),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.UnknownHandler(),
    ):
        opener.add_handler(handler)
    return opener.open(url, timeout=guard.timeout())


def url_for_humans(url: str) -> str:
    """The URL without its query: a signed URL's query is a credential."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def without_url_queries(value: Any) -> Any:
    """A JSON-like value with every https URL's query and fragment dropped."""
    if isinstance(value, str) and "://" in value:
        try:
            if urlsplit(value).scheme.lower() in ("http", "https"):  # HTTPS://... is a URL too
                return url_for_humans(value)
        except ValueError:  # a malformed host ("[..."): keep nothing after the path
            return value.split("?", 1)[0].split("#", 1)[0]
    if isinstance(value, dict):
        return {key: without_url_queries(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_url_queries(item) for item in value]
    return value
