"""virt_balloon_stats.exporter: listen addresses, basic auth, and the HTTP(S) server over a real collector.

The exporter runs a real :class:`~virt_balloon_stats.collector.Collector`
over fake libvirt domains and recorded QMP replies (``clients=[...]``, so no
connection is opened) and serves it on loopback; requests are made with the
standard library's HTTP client, or raw bytes where a client would refuse to
send them. TLS certificates are made by the ``openssl`` command in a
temporary directory. Timing is only ever a generous upper bound.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import http.client
import io
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.conftest import URI, World, load, now_for, wait_until, missing
from virt_balloon_stats import cli
from virt_balloon_stats.collector import Collector
from virt_balloon_stats.errors import InvalidArgument
from virt_balloon_stats.exporter import (
    DEFAULT_PORT,
    Exporter,
    ExporterConfig,
    check_password,
    hash_password,
    load_users,
    parse_listen,
)

#: Each domain's deadline: every recorded domain answers at once, so this only bounds a broken test.
TIMEOUT = 5.0

#: Seconds between cycles: long enough that a test sees exactly one cycle.
ONE_CYCLE = 3600.0

NAMES = ["virtio", "nostats"]

TEXT_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"


# -- listen addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:9474", ("127.0.0.1", 9474)),
        ("[::1]:9474", ("::1", 9474)),
        (":9474", ("", 9474)),
        ("localhost:1", ("localhost", 1)),
        ("[::]:65535", ("::", 65535)),
    ],
)
def test_parse_listen_accepts(text, expected):
    """IPv4 and host names as HOST:PORT, IPv6 in brackets, and :PORT for every address."""
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "9474",
        "127.0.0.1",
        "127.0.0.1:",
        "127.0.0.1:http",
        "127.0.0.1:-1",
        "127.0.0.1:65536",
        "::1:9474",
        "[::1]",
        "[not-ipv6]:9474",
        "[127.0.0.1]:9474",
    ],
)
def test_parse_listen_refuses(text):
    """Anything else is a usage error, not an address guessed at."""
    with pytest.raises(InvalidArgument):
        parse_listen(text)


def test_default_listen_is_loopback():
    """An exporter is reachable from elsewhere only when told so."""
    assert parse_listen(ExporterConfig().listen) == ("127.0.0.1", DEFAULT_PORT)


# -- passwords and the basic-auth file ------------------------------------------------------------


def test_hash_password_round_trip():
    """A hash verifies its password; two hashes of one password differ (random salt) and both verify."""
    first, second = hash_password("wonderland"), hash_password("wonderland")
    assert first != second
    assert first.startswith("scrypt$") and first.count("$") == 5
    assert check_password("wonderland", first) and check_password("wonderland", second)


def test_hash_password_with_a_given_salt_is_deterministic():
    """The salt is the only randomness: the same salt gives the same line."""
    salt = bytes(range(16))
    assert hash_password("pw", salt) == hash_password("pw", salt)
    assert hash_password("pw", salt).split("$")[4] == base64.b64encode(salt).decode()


@pytest.mark.parametrize("wrong", ["", "Wonderland", "wonderland ", "wonderlan"])
def test_check_password_wrong_password_is_false(wrong):
    """Any other password, however close, fails."""
    assert not check_password(wrong, hash_password("wonderland"))


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "scrypt",
        "wonderland",
        "bcrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAA",
        "scrypt$16384$8$1$AAAA",
        "scrypt$16384$8$1$AAAA$AAAA$AAAA",
        "scrypt$x$8$1$AAAA$AAAA",
        "scrypt$16384$8$1$!!!!$AAAA",
        "scrypt$16384$8$1$AAAA$!!!!",
        "scrypt$16384$8$1$AAAA$",
        "scrypt$3$8$1$AAAA$AAAA",
        "scrypt$16384$8$0$AAAA$AAAA",
    ],
)
def test_check_password_malformed_hash_is_false(encoded):
    """A hash that cannot be checked refuses the password instead of raising (or accepting)."""
    assert check_password("", encoded) is False
    assert check_password("wonderland", encoded) is False


def test_check_password_tampered_digest_is_false():
    """A valid-looking line whose digest was changed refuses the right password."""
    parts = hash_password("wonderland").split("$")
    digest = bytearray(base64.b64decode(parts[5]))
    digest[0] ^= 1
    parts[5] = base64.b64encode(bytes(digest)).decode()
    assert not check_password("wonderland", "$".join(parts))


def _users_file(tmp_path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "users"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o400])
def test_load_users_reads_users_and_skips_comments(tmp_path, mode):
    """USER:HASH lines, with comments and blank lines; owner- or group-readable files are fine."""
    alice, bob = hash_password("a"), hash_password("b")
    path = _users_file(tmp_path, f"# scrapers\n\nalice:{alice}\n   # indented comment\n  bob:{bob}  \n", mode)
    assert load_users(path) == {"alice": alice, "bob": bob}


@pytest.mark.parametrize(
    "bad",
    [
        "alice",
        "alice:",
        ":scrypt$1$2$3$4$5",
        "alice:bcrypt$1$2$3$4$5",
        "alice:scrypt$1$2$3",
        "alice:password",
    ],
)
def test_load_users_names_the_malformed_line(tmp_path, bad):
    """A malformed line is refused with the file and line number, and how to make a good one."""
    path = _users_file(tmp_path, f"# comment\nbob:{hash_password('b')}\n{bad}\n")
    with pytest.raises(InvalidArgument) as info:
        load_users(path)
    assert f"{path}:3:" in str(info.value)
    assert "--hash-password" in str(info.value)


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o666])
def test_load_users_refuses_a_world_readable_file(tmp_path, mode):
    """The file holds password hashes: readable by everyone is refused, with the fix."""
    path = _users_file(tmp_path, f"alice:{hash_password('a')}\n", mode)
    with pytest.raises(InvalidArgument) as info:
        load_users(path)
    assert "chmod" in str(info.value)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_load_users_refuses_a_file_without_users(tmp_path, text):
    """An auth file with no user would lock everyone out (or, worse, be taken for no auth)."""
    with pytest.raises(InvalidArgument) as info:
        load_users(_users_file(tmp_path, text))
    assert "no user" in str(info.value)


def test_load_users_missing_file(tmp_path):
    """A file that cannot be read is an InvalidArgument naming it, not an OSError."""
    with pytest.raises(InvalidArgument) as info:
        load_users(str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(info.value)


# -- the server ----------------------------------------------------------------------------------


def _ipv6_loopback() -> bool:
    """Whether this kernel can bind ::1 (some CI containers have no IPv6 at all)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


LOOPBACKS = ["127.0.0.1", "::1"]


def _listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _world(names: List[str] = NAMES) -> World:
    fixtures = [load(n) for n in names]
    return World(fixtures, now=now_for(fixtures[0]))


def _libvirt_calls(w: World) -> int:
    """Every call that reached the fake libvirt: connection, domains, and QEMU passthrough."""
    return len(w.conn.calls) + sum(len(d.calls) for d in w.domains) + len(w.transport.sent)


@contextlib.contextmanager
def _serving(
    w: Optional[World] = None, host: str = "127.0.0.1", wait: bool = True, **config: Any
) -> Iterator[Exporter]:
    """A started exporter over a collector on the fake libvirt; stopped on the way out."""
    if ":" in host and not _ipv6_loopback():
        missing("an IPv6 loopback (::1)")
    w = w if w is not None else _world()
    collector = Collector(clients=[w.client], timeout=config.pop("timeout", TIMEOUT))
    config.setdefault("interval", ONE_CYCLE)
    exporter = Exporter(collector, ExporterConfig(listen=_listen(host, 0), **config))
    exporter.start()
    try:
        if wait:
            assert wait_until(lambda: collector.last is not None)
        yield exporter
    finally:
        exporter.stop()


def _connection(exporter: Exporter, context: Optional[ssl.SSLContext] = None) -> http.client.HTTPConnection:
    if context is not None:
        return http.client.HTTPSConnection(exporter.host, exporter.port, timeout=10, context=context)
    return http.client.HTTPConnection(exporter.host, exporter.port, timeout=10)


def _request(
    exporter: Exporter,
    method: str = "GET",
    path: str = "/metrics",
    headers: Optional[Dict[str, str]] = None,
    context: Optional[ssl.SSLContext] = None,
) -> Tuple[int, Any, bytes]:
    """(status, headers, body) of one request on a fresh connection."""
    conn = _connection(exporter, context)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def _raw(exporter: Exporter, payload: bytes) -> bytes:
    """Send bytes no HTTP client would, and read everything the server answers until it closes."""
    with socket.create_connection((exporter.host, exporter.port), timeout=10) as sock:
        sock.sendall(payload)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def _up(text: str) -> Dict[str, float]:
    return {
        s.labels["uri"]: s.value
        for f in text_string_to_metric_families(text) for s in f.samples if s.name == "virt_balloon_up"
    }


def test_exporter_listens_on_an_ephemeral_port():
    """Port 0 binds a free port, and exporter.port (and url) say which one after start()."""
    w = _world()
    collector = Collector(clients=[w.client], timeout=TIMEOUT)
    exporter = Exporter(collector, ExporterConfig(listen="127.0.0.1:0", interval=ONE_CYCLE))
    exporter.start()
    try:
        assert exporter.port != 0
        assert exporter.url == f"http://127.0.0.1:{exporter.port}/metrics"
        status, _, _ = _request(exporter)
        assert status == 200
    finally:
        exporter.stop()


@pytest.mark.parametrize("host", LOOPBACKS)
def test_get_metrics_serves_the_text_format(host):
    """GET /metrics: 200, the 0.0.4 text format; it parses, and says the host is up after the first cycle."""
    with _serving(host=host) as exporter:
        assert exporter.url == f"http://{_listen(host, exporter.port)}/metrics"
        status, headers, body = _request(exporter)
    assert status == 200
    assert headers["Content-Type"] == TEXT_0_0_4
    assert int(headers["Content-Length"]) == len(body)
    text = body.decode()
    assert _up(text) == {URI: 1.0}
    domains = {s.labels["domain"] for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "virt_balloon_status"}
    assert domains == {f"vbs-tb-rec-{n}" for n in NAMES}


def test_get_metrics_with_openmetrics_accept():
    """A scraper that asks for OpenMetrics gets it, and it parses as OpenMetrics (ends in # EOF)."""
    with _serving() as exporter:
        status, headers, body = _request(
            exporter, headers={"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"}
        )
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(text)}
    assert [s.value for s in families["virt_balloon_up"].samples] == [1.0]
    assert families["virt_balloon_swap_in_bytes"].type == "counter"


#: What Debian 12's Prometheus (2.42) sends, taken from its scrape code.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                     "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


@pytest.mark.parametrize("accept", ["", PROMETHEUS_ACCEPT, "application/openmetrics-text; version=1.0.0; "
                                    "escaping=allow-utf-8"], ids=["plain", "prometheus", "utf8-names"])
def test_a_scrape_body_is_what_the_librarys_encoder_writes(accept):
    """The exporter writes the two usual formats itself (metrics.exposition) and leaves any other
    to prometheus_client; every body is the library's, byte for byte, for the same cycle."""
    from prometheus_client.exposition import choose_encoder

    with _serving() as exporter:
        status, headers, body = _request(exporter, headers={"Accept": accept})
        encoder, content_type = choose_encoder(accept)
        expected = encoder(exporter.registry)  # the same last cycle (the collector waits an interval)
    assert status == 200 and headers["Content-Type"] == content_type
    assert body == expected


def test_get_metrics_gzip_when_asked():
    """Accept-Encoding gzip: the body is gzip, and unpacks to the same exposition."""
    with _serving() as exporter:
        status, headers, body = _request(exporter, headers={"Accept-Encoding": "gzip"})
        _, _, plain = _request(exporter)
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert int(headers["Content-Length"]) == len(body)
    assert gzip.decompress(body) == plain


def test_plain_get_is_not_gzipped():
    """Without Accept-Encoding the body is not compressed."""
    with _serving() as exporter:
        _, headers, body = _request(exporter)
    assert headers.get("Content-Encoding") is None
    assert body.startswith(b"# HELP ")


@pytest.mark.parametrize("path", ["/metrics", "/"])
def test_head_has_headers_and_no_body(path):
    """HEAD: the status and headers of GET (the same length), no body."""
    with _serving() as exporter:
        get_status, get_headers, get_body = _request(exporter, path=path)
        status, headers, body = _request(exporter, method="HEAD", path=path)
    assert (status, get_status) == (200, 200)
    assert body == b""
    assert headers["Content-Type"] == get_headers["Content-Type"]
    assert int(headers["Content-Length"]) == len(get_body) > 0


def test_landing_page():
    """GET /: a small HTML page that links to /metrics."""
    with _serving() as exporter:
        status, headers, body = _request(exporter, path="/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'href="/metrics"' in body


@pytest.mark.parametrize(
    "path", ["/<script>alert(1)</script>", "/metrics/<b>x", "/favicon.ico?q=<i>", "/%3Cs%3E"]
)
def test_unknown_path_is_a_404_that_echoes_nothing(path):
    """Any other path: exactly "404 Not Found\\n", and nothing of what was asked."""
    with _serving() as exporter:
        status, headers, body = _request(exporter, path=path)
    assert status == 404
    assert body == b"404 Not Found\n"
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert path.encode() not in body and b"<" not in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_are_405_with_allow(method):
    """Only GET and HEAD are served; the 405 says which ones, and echoes nothing."""
    with _serving() as exporter:
        status, headers, body = _request(exporter, method=method, path="/metrics?<x>")
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"
    assert body == b"405 Method Not Allowed\n"


#: Markers of the malformed requests below: none may come back.
_MARKERS = [b"GARBAGE", b"script", b"9.9", b"x.y", b"extra", b"alert", b"POST", b"<"]


@pytest.mark.parametrize(
    "payload",
    [
        b"GARBAGE /<script>x HTTP/9.9\r\n\r\n",
        b"GARBAGE /<script>x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /<script>x HTTP/1.1 extra\r\n\r\n",
        b"GET /<script>x HTTP/x.y\r\n\r\n",
        b"<script>alert(1)</script>\r\n\r\n",
        b"POST /<script>x\r\n\r\n",
        b"GET /<script>x\r\n\r\n",
    ],
)
def test_malformed_request_never_echoes_any_part_of_it(payload):
    """Whatever the server makes of a malformed request, no part of it comes back (no reflected XSS)."""
    with _serving() as exporter:
        answer = _raw(exporter, payload)
    assert re.search(rb"\b[45][0-9][0-9] ", answer), answer
    for marker in _MARKERS:
        assert marker not in answer, (marker, answer)


def test_scrapes_make_no_libvirt_call():
    """Scrapes serve the last cycle: the fake libvirt sees no call however often /metrics is read."""
    w = _world()
    with _serving(w) as exporter:
        before = _libvirt_calls(w)
        assert before > 0
        for _ in range(5):
            status, _, body = _request(exporter)
            assert status == 200 and _up(body.decode()) == {URI: 1.0}
        after = _libvirt_calls(w)
    assert after == before


def test_scrape_before_the_first_cycle_is_empty_and_does_not_wait():
    """A hung QEMU holds the first cycle; a scrape meanwhile answers at once, with no series at all."""
    w = _world()
    release = w.domains[0].hang()
    try:
        with _serving(w, wait=False, timeout=60.0) as exporter:
            assert w.domains[0].wait_held()
            status, headers, body = _request(exporter)
            assert exporter.collector.last is None  # answered while the cycle was still waiting on QEMU
            release.set()
            assert wait_until(lambda: exporter.collector.last is not None)
            _, _, later = _request(exporter)
    finally:
        release.set()
    assert status == 200 and headers["Content-Type"] == TEXT_0_0_4
    assert body == b""
    assert _up(later.decode()) == {URI: 1.0}


def test_stop_while_qemu_hangs_returns_and_leaves_no_thread_to_die_later(monkeypatch):
    """stop() during a cycle held by a hung QEMU returns within 2 s; when QEMU moves, nothing crashes."""
    crashes: List[Any] = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    before = set(threading.enumerate())
    w = _world()
    release = w.domains[0].hang()
    try:
        with _serving(w, wait=False, timeout=60.0) as exporter:
            assert w.domains[0].wait_held()
            begun = time.monotonic()
            exporter.stop()
            assert time.monotonic() - begun < 2.0
        loops = [t for t in set(threading.enumerate()) - before if t.name == "vbs-collector-loop"]
    finally:
        release.set()  # QEMU answers at last: the abandoned cycle goes on
    for thread in loops:
        thread.join(10.0)
    assert [f"{c.exc_type.__name__}: {c.exc_value}" for c in crashes if c.thread in loops] == []


@pytest.mark.parametrize("host", LOOPBACKS)
def test_stop_returns_quickly_and_closes_the_port(host):
    """stop() returns within 2 s, stops the collector, and a new connection is refused."""
    with _serving(host=host) as exporter:
        assert _request(exporter)[0] == 200
        begun = time.monotonic()
        exporter.stop()
        assert time.monotonic() - begun < 2.0
        assert exporter.collector.stopping
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((exporter.host, exporter.port), timeout=5).close()


def test_stop_ends_connections_already_open():
    """After stop() the exporter serves nothing more, not even on a keep-alive connection opened before."""
    with _serving() as exporter:
        conn = _connection(exporter)
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            assert response.status == 200 and response.read()
            exporter.stop()
            with pytest.raises((http.client.HTTPException, OSError)):
                conn.request("GET", "/metrics")
                conn.getresponse().read()
        finally:
            conn.close()


def test_exporter_config_is_checked_before_anything_starts():
    """A bad interval or listen address is refused when the exporter is made, before any call."""
    w = _world()
    collector = Collector(clients=[w.client], timeout=TIMEOUT)
    with pytest.raises(InvalidArgument):
        Exporter(collector, ExporterConfig(interval=0))
    with pytest.raises(InvalidArgument):
        Exporter(collector, ExporterConfig(listen="::1:9474"))
    assert _libvirt_calls(w) == 0


# -- basic auth ------------------------------------------------------------------------------------


def _basic(user: str, password: str) -> Dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def users(tmp_path) -> str:
    return _users_file(tmp_path, f"alice:{hash_password('wonderland')}\n")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        _basic("alice", "wrong"),
        _basic("alice", ""),
        _basic("mallory", "wonderland"),
        {"Authorization": "Basic !!!not-base64"},
        {"Authorization": "Bearer wonderland"},
    ],
    ids=["none", "wrong-password", "empty-password", "unknown-user", "bad-base64", "not-basic"],
)
def test_basic_auth_refuses_without_the_right_credentials(users, headers):
    """401 with a WWW-Authenticate challenge, on /metrics and on every other path."""
    with _serving(basic_auth_file=users) as exporter:
        for path in ("/metrics", "/", "/nope"):
            status, response_headers, body = _request(exporter, path=path, headers=headers)
            assert status == 401, path
            assert response_headers["WWW-Authenticate"].startswith('Basic realm="virt-balloon-stats"')
            assert body == b"401 Unauthorized\n"


def test_basic_auth_serves_with_the_right_credentials(users):
    """The right user and password: 200 and the metrics (twice: the cached verdict is the same)."""
    with _serving(basic_auth_file=users) as exporter:
        for _ in range(2):
            status, _, body = _request(exporter, headers=_basic("alice", "wonderland"))
            assert status == 200
            assert _up(body.decode()) == {URI: 1.0}


def test_basic_auth_file_that_is_world_readable_stops_the_exporter_from_being_made(tmp_path):
    """A bad auth file is an InvalidArgument at construction, never an exporter without auth."""
    path = _users_file(tmp_path, f"alice:{hash_password('wonderland')}\n", 0o644)
    w = _world()
    with pytest.raises(InvalidArgument):
        Exporter(Collector(clients=[w.client], timeout=TIMEOUT), ExporterConfig(basic_auth_file=path))


# -- TLS -----------------------------------------------------------------------------------------


def _certificate(directory, cn: str = "localhost") -> Tuple[str, str]:
    """A fresh self-signed certificate for 127.0.0.1 and its key, made by the openssl command."""
    if shutil.which("openssl") is None:
        missing("the openssl command (Debian package openssl)")
    os.makedirs(directory, exist_ok=True)
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
            "-days", "1", "-subj", f"/CN={cn}", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def _trusting(cert_pem: bytes) -> ssl.SSLContext:
    """A client context that trusts exactly this certificate."""
    return ssl.create_default_context(cadata=cert_pem.decode())


def test_tls_serves_https_and_refuses_plain_http(tmp_path):
    """With a certificate and key: https works for a client trusting it; plain http gets no answer."""
    cert, key = _certificate(tmp_path / "tls")
    trust = _trusting(open(cert, "rb").read())
    with _serving(tls_cert=cert, tls_key=key) as exporter:
        assert exporter.url.startswith("https://127.0.0.1:")
        status, headers, body = _request(exporter, context=trust)
        assert status == 200 and headers["Content-Type"] == TEXT_0_0_4
        assert _up(body.decode()) == {URI: 1.0}
        with pytest.raises((http.client.HTTPException, OSError)):
            _request(exporter)
        # The failed plain request did not take the server down.
        assert _request(exporter, context=trust)[0] == 200


def test_tls_reload_swaps_the_certificate(tmp_path):
    """reload() reads the files again: new connections get the renewed certificate, no restart."""
    cert, key = _certificate(tmp_path / "tls", cn="first")
    old = _trusting(open(cert, "rb").read())
    with _serving(tls_cert=cert, tls_key=key) as exporter:
        assert _request(exporter, context=old)[0] == 200
        renewed_cert, renewed_key = _certificate(tmp_path / "renewed", cn="renewed")
        shutil.copyfile(renewed_cert, cert)
        shutil.copyfile(renewed_key, key)
        new = _trusting(open(cert, "rb").read())
        with pytest.raises(ssl.SSLCertVerificationError):
            _request(exporter, context=new)  # not read again yet
        exporter.reload()
        assert _request(exporter, context=new)[0] == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            _request(exporter, context=old)


def test_tls_reload_with_a_bad_certificate_keeps_the_old_one(tmp_path):
    """A reload that cannot read the files raises and leaves the working certificate in use."""
    cert, key = _certificate(tmp_path / "tls")
    trust = _trusting(open(cert, "rb").read())
    with _serving(tls_cert=cert, tls_key=key) as exporter:
        original = open(cert, "rb").read()
        with open(cert, "w") as handle:
            handle.write("not a certificate\n")
        with pytest.raises(InvalidArgument):
            exporter.reload()
        assert _request(exporter, context=trust)[0] == 200
        with open(cert, "wb") as handle:
            handle.write(original)


@pytest.mark.parametrize("which", ["cert", "key"])
def test_tls_needs_both_cert_and_key(tmp_path, which):
    """A certificate without its key (or the reverse) is refused, never served as plain http."""
    cert, key = _certificate(tmp_path / "tls")
    config = ExporterConfig(tls_cert=cert) if which == "cert" else ExporterConfig(tls_key=key)
    w = _world()
    with pytest.raises(InvalidArgument):
        Exporter(Collector(clients=[w.client], timeout=TIMEOUT), config)


def test_tls_with_missing_files_is_invalid_argument(tmp_path):
    """Files that cannot be loaded are an InvalidArgument at construction."""
    w = _world()
    config = ExporterConfig(tls_cert=str(tmp_path / "no-cert.pem"), tls_key=str(tmp_path / "no-key.pem"))
    with pytest.raises(InvalidArgument):
        Exporter(Collector(clients=[w.client], timeout=TIMEOUT), config)


# -- the command line -------------------------------------------------------------------------------


def _main(argv: List[str]) -> Tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_hash_password_prints_a_hash_check_password_accepts(monkeypatch):
    """exporter --hash-password reads stdin and prints one line for the basic-auth file."""
    monkeypatch.setattr("sys.stdin", io.StringIO("wonderland\n"))
    code, out, err = _main(["exporter", "--hash-password"])
    assert (code, err) == (0, "")
    [line] = out.splitlines()
    assert check_password("wonderland", line)
    assert not check_password("wonderland\n", line)


def test_cli_hash_password_without_a_password_is_a_usage_error(monkeypatch):
    """An empty stdin would hash the empty password: refused, exit 2."""
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, out, err = _main(["exporter", "--hash-password"])
    assert code == 2 and out == ""
    assert "password on stdin" in err


@pytest.mark.parametrize("fmt", ["json", "prometheus"])
def test_cli_exporter_refuses_format(fmt):
    """The exporter has its own output; --format is a usage error (exit 2) before anything starts."""
    code, out, err = _main(["exporter", "--format", fmt])
    assert code == 2 and out == ""
    assert "--format" in err
