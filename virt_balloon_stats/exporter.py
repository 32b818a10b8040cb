"""The Prometheus exporter: a background collector, and an HTTP server that serves its last cycle.

One exporter per hypervisor. The collector runs every ``interval`` seconds
in its own thread; a scrape serves the last finished cycle through
:class:`~virt_balloon_stats.metrics.CycleMetrics` and never makes a libvirt
call, so a slow or hung hypervisor cannot make a scrape time out (the cycle's
age is in ``virt_balloon_cycle_timestamp_seconds``).

The HTTP side is deliberately small (the standard library's threading HTTP
server): ``GET /metrics``, a landing page at ``/``, ``404`` for anything else,
``405`` for methods other than GET and HEAD, and no part of the request is
ever echoed back. It listens on loopback unless told otherwise, and offers
TLS and basic auth as Prometheus' own exporters do: a certificate and key
(re-read on SIGHUP, so a renewed certificate needs no restart) and a file of
``user:scrypt-hash`` lines (see :func:`hash_password`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import gzip
import hashlib
import hmac
import http.server
import ipaddress
import logging
import os
import re
import secrets
import selectors
import socket
import ssl
import threading
from typing import Any, Callable, Dict, Optional, Sequence, Set, Tuple

from prometheus_client.exposition import choose_encoder

from virt_balloon_stats.collector import Collector, Cycle
from virt_balloon_stats.errors import InvalidArgument
from virt_balloon_stats.metrics import CycleMetrics, exposition, registry_for

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_LISTEN",
    "parse_listen",
    "hash_password",
    "check_password",
    "load_users",
    "ExporterConfig",
    "Exporter",
]

LOG = logging.getLogger(__name__)

#: Not 9177 (the libvirt exporters that often run on the same hypervisor use
#: it) nor 9100 (node_exporter).
DEFAULT_PORT = 9474
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"

_SCRYPT = {"n": 2**14, "r": 8, "p": 1}

#: Seconds a client may take to send its request (and its TLS handshake).
_CLIENT_TIMEOUT = 10.0

_LANDING = b"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>virt-balloon-stats exporter</title></head>
<body><h1>virt-balloon-stats exporter</h1>
<p>QEMU virtio-balloon guest memory statistics, read through libvirt.</p>
<p><a href="/metrics">Metrics</a></p></body></html>
"""


def parse_listen(text: str) -> Tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (every address) -> (host, port).

    Port 0 asks the kernel for any free port (:attr:`Exporter.port` then says which).

    :raise InvalidArgument: For anything else, or a port over 65535.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port_text):
        raise InvalidArgument(f"--listen wants HOST:PORT or [IPV6]:PORT, not {text!r}")
    port = int(port_text)
    if port > 65535:
        raise InvalidArgument(f"port {port} is not between 0 (any free port) and 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidArgument(f"{host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise InvalidArgument(f"put an IPv6 address in brackets: {'[' + host + ']:' + str(port)!r}")
    return host, port


def hash_password(password: str, salt: Optional[bytes] = None) -> str:
    """A line's hash for the basic-auth file: ``scrypt$N$r$p$SALT$HASH`` (base64)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT)
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches a hash made by :func:`hash_password` (constant time)."""
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest, validate=True)
        actual = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt, validate=True), n=int(n), r=int(r), p=int(p),
            dklen=len(expected),
        )
    except (ValueError, TypeError, OverflowError, MemoryError, binascii.Error):
        # scrypt refuses absurd n, r or p with any of these: a broken hash matches nothing.
        return False
    return hmac.compare_digest(actual, expected)


def _shown(path: str) -> str:
    """A path for a one-line message: as is, or quoted when it holds control characters."""
    return path if path.isprintable() else repr(path)


def load_users(path: str) -> Dict[str, str]:
    """Read a basic-auth file: one ``user:scrypt$...`` per line, ``#`` comments.

    :raise InvalidArgument: When the file cannot be read, a line is malformed,
        or the file is readable by others than its owner (it holds secrets'
        hashes; keep it 0600 or 0640).
    """
    try:
        with open(path, encoding="utf-8") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            lines = handle.read().splitlines()
    except OSError as err:
        raise InvalidArgument(
            f"cannot read the basic-auth file {_shown(path)}: {err.strerror or err}"
        ) from err
    except UnicodeDecodeError as err:
        raise InvalidArgument(f"the basic-auth file {_shown(path)} is not UTF-8 text ({err.reason})") from err
    if mode & 0o004:
        raise InvalidArgument(f"{_shown(path)} is readable by everyone; chmod 0600 it")
    users: Dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        if not sep or not user or not encoded.startswith("scrypt$") or encoded.count("$") != 5:
            raise InvalidArgument(
                f"{_shown(path)}:{number}: want USER:scrypt$... (make one with 'virt-balloon-stats exporter "
                "--hash-password')"
            )
        users[user] = encoded
    if not users:
        raise InvalidArgument(f"{_shown(path)} has no user")
    return users


@dataclasses.dataclass(frozen=True)
class ExporterConfig:
    """What the exporter serves, and how.

    :ivar listen: ``HOST:PORT``; loopback by default.
    :ivar interval: Seconds between cycles.
    :ivar tls_cert: PEM certificate (chain); with ``tls_key``, serve HTTPS.
    :ivar basic_auth_file: ``user:scrypt-hash`` lines; then every request needs them.
    """

    listen: str = DEFAULT_LISTEN
    interval: float = 15.0
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    basic_auth_file: Optional[str] = None


def _accepts_gzip(header: str) -> bool:
    """Whether an ``Accept-Encoding`` header allows gzip (``gzip;q=0`` does not)."""
    for item in header.split(","):
        token, _, params = item.strip().partition(";")
        if token.strip().lower() in ("gzip", "*"):
            quality = params.strip().lower()
            return not re.fullmatch(r"q=0(\.0*)?", quality.replace(" ", ""))
    return False


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    timeout = 0.0  # handle_request is called when a connection is there: it must not wait for one
    exporter: "Exporter"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Before the socket: a failed bind calls server_close, which closes these too.
        self._wake_read, self._wake_write = socket.socketpair()
        super().__init__(*args, **kwargs)

    def serve(self) -> None:
        """Accept requests until :meth:`wake_to_stop`, asleep in between.

        ``serve_forever`` wakes every ``poll_interval`` to look for a
        shutdown: 0.1 ms of CPU a wake-up, 2.6 ms every 5 s at the 0.2 s
        that keeps ``stop()`` prompt, about as much as a scrape of 30
        domains costs. Here a socket pair wakes the loop instead.
        """
        with selectors.DefaultSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            while True:
                for key, _events in selector.select():
                    if key.fileobj is self._wake_read:
                        return
                    self.handle_request()  # accept, hand to a thread (timeout 0: never waits here)

    def wake_to_stop(self) -> None:
        """Have :meth:`serve` return (from any thread)."""
        with contextlib.suppress(OSError):
            self._wake_write.send(b"x")

    def server_close(self) -> None:
        super().server_close()
        self._wake_read.close()
        self._wake_write.close()

    def get_request(self) -> Tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        sock.settimeout(_CLIENT_TIMEOUT)  # a client that stalls gives up its thread
        context = self.exporter.tls
        if context is not None:
            # The handshake happens in the request's own thread (see _Handler.setup),
            # so a slow client never holds up the accept loop.
            sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that goes away or speaks no TLS is not worth a traceback."""
        LOG.debug("request from %s failed", client_address, exc_info=True)


#: What Prometheus and a plain client are answered in (``choose_encoder``'s
#: content types), which :func:`~virt_balloon_stats.metrics.exposition` writes.
_TEXT = "text/plain; version=0.0.4; charset=utf-8"
_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores"


def _written(registry: Any, encoder: Callable[[Any], bytes], content_type: str) -> bytes:
    """The scrape's body: our writer for the two usual formats, else the library's encoder."""
    if content_type in (_TEXT, _OPENMETRICS):
        body = exposition(registry.collect(), openmetrics=content_type == _OPENMETRICS)
        if body is not None:
            return body
    return encoder(registry)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    server_version = "virt-balloon-stats"
    # One request per connection: a scrape every few seconds gains nothing from
    # keep-alive, and stop() then leaves no connection being served.
    protocol_version = "HTTP/1.0"

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        super().setup()
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        LOG.debug("%s %r", self.address_string(), format % args)  # repr: control characters escaped

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """Errors say only their status: nothing of the request comes back."""
        phrase = http.HTTPStatus(code).phrase
        body = f"{code} {phrase}\n".encode()
        self.send_response(code, phrase)
        if code == 405:
            self.send_header("Allow", "GET, HEAD")
        if code == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="virt-balloon-stats", charset="UTF-8"')
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)
        self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        self._answer(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(head=True)

    def _not_allowed(self) -> None:
        self.send_error(405)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def _answer(self, head: bool) -> None:
        exporter = self.server.exporter
        if not exporter.authorized(self.headers.get("Authorization")):
            self.send_error(401)
            return
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            body = _written(exporter.registry, encoder, content_type)
            if _accepts_gzip(self.headers.get("Accept-Encoding", "")):
                self._send(gzip.compress(body), content_type, head, encoding="gzip")
            else:
                self._send(body, content_type, head)
        elif path == "/":
            self._send(_LANDING, "text/html; charset=utf-8", head)
        else:
            self.send_error(404)

    def _send(self, body: bytes, content_type: str, head: bool, encoding: str = "") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Vary", "Accept-Encoding")
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


class Exporter:
    """A collector in the background and an HTTP server over its last cycle.

    :param collector: Built with ``events=True`` and ``log_changes=True`` for a
        service; the exporter starts and stops it.
    :param on_cycle: Called in the collector's thread after each cycle (a
        :class:`~virt_balloon_stats.keeper.HistoryKeeper` records it).
    :param extra: More ``prometheus_client`` collectors to serve beside the
        cycle's families (the keeper's advice).
    :raise InvalidArgument: For a bad listen address, TLS files or auth file.
    """

    def __init__(
        self,
        collector: Collector,
        config: ExporterConfig,
        *,
        on_cycle: Optional[Callable[[Cycle], None]] = None,
        extra: Sequence[Any] = (),
    ) -> None:
        if bool(config.tls_cert) != bool(config.tls_key):
            raise InvalidArgument("TLS needs both --tls-cert and --tls-key")
        if not config.interval > 0:
            raise InvalidArgument(f"interval must be more than 0 seconds, not {config.interval}")
        self.collector = collector
        self.config = config
        self.host, self.port = parse_listen(config.listen)
        self.registry = registry_for(CycleMetrics(lambda: collector.last, lambda: collector.totals))
        self._on_cycle = on_cycle
        for served in extra:
            self.registry.register(served)
        self.tls: Optional[ssl.SSLContext] = None
        self._users: Dict[str, str] = {}
        self._verified: Set[Tuple[str, str]] = set()  # right credentials only: bounded by the users
        self._dummy = hash_password(secrets.token_urlsafe())  # checked for unknown users
        self._lock = threading.Lock()
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self.reload()

    @property
    def url(self) -> str:
        """Where ``/metrics`` is served (with the port actually bound)."""
        scheme = "https" if self.tls else "http"
        host = f"[{self.host}]" if ":" in self.host else (self.host or "0.0.0.0")
        return f"{scheme}://{host}:{self.port}/metrics"

    def reload(self) -> None:
        """Read the TLS certificate and key and the basic-auth file again (SIGHUP).

        :raise InvalidArgument: When one cannot be read; the old ones stay in use.
        """
        tls = None
        if self.config.tls_cert and self.config.tls_key:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                tls.load_cert_chain(self.config.tls_cert, self.config.tls_key)
            except (OSError, ssl.SSLError) as err:
                raise InvalidArgument(f"cannot load the TLS certificate and key: {err}") from err
        users = load_users(self.config.basic_auth_file) if self.config.basic_auth_file else {}
        with self._lock:
            self.tls, self._users, self._verified = tls, users, set()

    def authorized(self, header: Optional[str]) -> bool:
        """Whether a request's ``Authorization`` header passes (always, without an auth file)."""
        with self._lock:
            users = self._users
        if not users:
            return True
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        encoded = users.get(user)
        if encoded is None:
            check_password(password, self._dummy)  # one scrypt run, as for a known user
            return False
        key = (user, hashlib.sha256(password.encode()).hexdigest())
        with self._lock:
            if key in self._verified:
                return True
        if not check_password(password, encoded):
            return False  # every wrong guess costs a full scrypt run
        with self._lock:
            self._verified.add(key)
        return True

    def start(self) -> None:
        """Bind, start the collector, and serve in a background thread.

        :raise InvalidArgument: When the address cannot be bound.
        """
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server_class = type("_BoundServer", (_Server,), {"address_family": family})
        try:
            server = server_class((self.host, self.port), _Handler)
        except OSError as err:
            raise InvalidArgument(f"cannot listen on {self.config.listen}: {err.strerror or err}") from err
        server.exporter = self
        self.port = server.server_address[1]
        self._server = server
        self.collector.start(self.config.interval, self._on_cycle)
        self._thread = threading.Thread(target=server.serve, name="vbs-http", daemon=True)
        self._thread.start()
        LOG.info("serving %s, collecting every %g s", self.url, self.config.interval)

    def stop(self) -> None:
        """Stop serving and collecting; returns within about a second."""
        if self._server is not None:
            self._server.wake_to_stop()
            if self._thread is not None:
                self._thread.join()
            self._server.server_close()
            self._server = None
        self.collector.stop(wait=1.0)
        LOG.info("stopped")
