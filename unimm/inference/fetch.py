"""Fetching a remote image for ``unimm serve --allow-remote-images``, without letting a client
use the server to reach what it should not.

- ``http://`` and ``https://`` only, on every hop (a redirect to any other scheme is refused);
- every hop's host must resolve to public addresses only — no loopback, private, link-local
  (cloud metadata at 169.254.169.254), multicast or reserved ones — unless the operator allows
  private hosts (``serve.allow_private_image_hosts``, for an image store on the same network);
- one deadline for the whole fetch (``fetch_timeout_s``), not per read, so a slow server cannot
  hold a worker;
- at most ``max_bytes``, and a ``Content-Type`` of ``image/*``.

The address check resolves the name before connecting; a name whose DNS answer changes between
the check and the connection (rebinding) is not caught here — a server exposed to untrusted
clients should leave private hosts off and sit behind an egress proxy.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

_SCHEMES = ("http", "https")
_CHUNK = 1 << 16


class FetchRefused(ValueError):
    """A remote image that is not fetched, and why."""


def check_url(url: str, *, private_hosts: bool) -> None:
    """Refuse a URL of another scheme, or whose host resolves to a non-public address.

    Raises:
        FetchRefused: naming the scheme, or the address and the setting that would allow it.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in _SCHEMES or not parts.hostname:
        raise FetchRefused(f"only http(s) image URLs are fetched, not {parts.scheme or 'this'}://")
    if private_hosts:
        return
    try:
        answers = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchRefused(f"the image host {parts.hostname} cannot be resolved ({exc})") from None
    for *_, address in answers:
        ip = ipaddress.ip_address(address[0].split("%")[0])
        if not ip.is_global:
            raise FetchRefused(
                f"the image host {parts.hostname} is at {ip}, not a public address; the server fetches "
                "only public hosts unless started with --set serve.allow_private_image_hosts=true"
            )


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, private_hosts: bool) -> None:
        self.private_hosts = private_hosts

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_url(newurl, private_hosts=self.private_hosts)  # every hop, not only the first
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_image(url: str, *, timeout_s: float, max_bytes: int, private_hosts: bool) -> bytes:
    """The bytes of the image at ``url`` (module docs for what is refused).

    Raises:
        FetchRefused: a refused URL, a failed or slow fetch, a body over ``max_bytes`` or not an image.
    """
    check_url(url, private_hosts=private_hosts)
    deadline = time.monotonic() + timeout_s
    opener = urllib.request.build_opener(_CheckedRedirects(private_hosts))
    request = urllib.request.Request(url, headers={"User-Agent": "unimm-serve", "Accept": "image/*"})
    data = bytearray()
    try:
        with opener.open(request, timeout=timeout_s) as response:
            kind = response.headers.get_content_type()
            if not kind.startswith("image/"):
                raise FetchRefused(f"the URL gives {kind}, not an image")
            while chunk := response.read(_CHUNK):
                data += chunk
                if len(data) > max_bytes:
                    raise FetchRefused(f"the image at the URL is over {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise FetchRefused(f"fetching the image took over {timeout_s:g} s")
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise FetchRefused(f"the image URL cannot be fetched ({getattr(exc, 'reason', exc)})") from None
    return bytes(data)
