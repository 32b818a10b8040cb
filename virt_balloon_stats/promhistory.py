"""Each domain's history from Prometheus: the points advice needs, made by PromQL over the exporter's series.

Where Prometheus already scrapes the exporter of every hypervisor, it holds
the history ``record`` would keep, for every host at once. ``advise
--prometheus URL`` reads it through the HTTP API instead of a history file
and hands the same :class:`~virt_balloon_stats.advice.Point` list to the
same :func:`~virt_balloon_stats.advice.advise`, so both sources give the
same advice for the same figures.

A point is one query step (a minute, or ``window / 10,000`` when longer:
Prometheus answers at most 11,000 points per series), evaluated at its end
over the step before it:

===================  ==============================================================
Point field          PromQL, over the step
===================  ==============================================================
``used_peak``        ``max_over_time(virt_balloon_used_memory_bytes[step])``
``ok_seconds``       ``count_over_time`` of that series (served only while the
                     figures are ok) over that of ``virt_balloon_status`` (served
                     every scrape), times the step
``actual``           ``last_over_time(virt_balloon_actual_bytes[step])``
counters             ``clamp_min(X - X offset step, 0)``: the increase, and 0
                     across a reset, as :func:`~virt_balloon_stats.advice.deltas`
                     counts it (``increase()`` would count a rebooted guest's
                     boot-time faults as a burst)
===================  ==============================================================

A domain's first scraped step is partly before its first scrape (and its
last one, after it went away): such a point is as long as the scrapes it
holds, against the most any step of the domain holds, and ends at the
step's end, so a short history is not taken for a longer one, nor for a
less complete one.

Nine range queries cover every domain, whatever their number; the answer is
kept for the window asked, since ``advise`` asks the same window for each
domain. This is the only module that speaks HTTP to Prometheus (stdlib
``urllib``); :func:`points_from_answers` is its pure half.
"""

from __future__ import annotations

import collections
import json
import math
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from virt_balloon_stats.advice import COUNTERS, Point
from virt_balloon_stats.errors import HistoryError, InvalidArgument

__all__ = ["MIN_STEP_SECONDS", "MAX_STEPS", "QUERIES", "step_for", "points_from_answers", "PrometheusHistory"]

#: The shortest step: Prometheus' usual scrape intervals (15 s to 1 min) fit in it.
MIN_STEP_SECONDS = 60
#: Steps per query at most, under Prometheus' limit of 11,000 points per series.
MAX_STEPS = 10_000

#: Counter series by :class:`Point` field (the exporter's names for :data:`COUNTERS`).
_COUNTER_SERIES = {
    "swap_in": "virt_balloon_swap_in_bytes_total",
    "major_faults": "virt_balloon_major_faults_total",
    "oom_kills": "virt_balloon_oom_kills_total",
    "alloc_stalls": "virt_balloon_alloc_stalls_total",
    "direct_reclaims": "virt_balloon_direct_reclaims_bytes_total",
}
assert set(_COUNTER_SERIES) == set(COUNTERS)

#: What each answer is, by name; ``{step}`` is the step in seconds.
QUERIES: Mapping[str, str] = {
    "used_peak": "max_over_time(virt_balloon_used_memory_bytes[{step}s])",
    "ok_scrapes": "count_over_time(virt_balloon_used_memory_bytes[{step}s])",
    "scrapes": 'count_over_time(virt_balloon_status{{status="ok"}}[{step}s])',
    "actual": "last_over_time(virt_balloon_actual_bytes[{step}s])",
    **{field: f"clamp_min({name} - {name} offset {{step}}s, 0)" for field, name in _COUNTER_SERIES.items()},
}

#: One answer: per series, its labels and its (time, value) pairs.
Answer = Sequence[Mapping[str, Any]]


def step_for(since: float, until: float) -> int:
    """The query step for a window: whole seconds, at least a minute, at most :data:`MAX_STEPS` steps."""
    return max(MIN_STEP_SECONDS, math.ceil((until - since) / MAX_STEPS))


def _values(series: Mapping[str, Any]) -> List[Tuple[float, float]]:
    """A matrix series' finite values; Prometheus sends each as ``[time, "value"]``."""
    out = []
    for when, text in series.get("values", ()):
        value = float(text)
        if math.isfinite(value):
            out.append((float(when), value))
    return out


def points_from_answers(answers: Mapping[str, Answer], step: int, source: str = "Prometheus"
                        ) -> Dict[str, List[Point]]:
    """Every domain's points, by UUID, from the matrix answers of :data:`QUERIES`.

    A domain is known by its ``uuid`` label; series of one domain from
    several targets (it migrated, or two jobs scrape one exporter) are
    combined per step: the highest peak and balloon size, the scrapes and
    increases summed.

    :raise HistoryError: When an answer is not a Prometheus matrix (``source``
        names the server in it).
    """
    merged: Dict[str, Dict[float, Dict[str, float]]] = collections.defaultdict(
        lambda: collections.defaultdict(dict)
    )
    for name in QUERIES:
        for series in answers.get(name, ()):
            try:
                uuid = series["metric"]["uuid"]
                values = _values(series)
            except (KeyError, TypeError, ValueError) as err:
                raise HistoryError(f"{source}: the answer to {name} has a series that is not one: {err!r}",
                                   path=source) from err
            highest = name in ("used_peak", "actual")
            for when, value in values:
                at = merged[uuid][when]
                if name in at:
                    value = max(at[name], value) if highest else at[name] + value
                at[name] = value
    out: Dict[str, List[Point]] = {}
    for uuid, steps in merged.items():
        full = max((at.get("scrapes", 0.0) for at in steps.values()), default=0.0)
        points = []
        for when in sorted(steps):
            at = steps[when]
            scrapes = at.get("scrapes", 0.0)
            if not scrapes:
                continue  # not scraped in this step: the domain was not there
            seconds = step * min(1.0, scrapes / full)
            ok = min(seconds, step * at.get("ok_scrapes", 0.0) / full)
            peak = at.get("used_peak")
            actual = at.get("actual")
            points.append(Point(
                start=when - seconds,
                seconds=seconds,
                ok_seconds=ok,
                used_peak=round(peak) if peak is not None and peak >= 0 and ok > 0 else None,
                actual=round(actual) if actual is not None and actual >= 0 else None,
                **{field: round(at.get(field, 0.0)) for field in _COUNTER_SERIES},
            ))
        out[uuid] = points
    return out


class PrometheusHistory:
    """Domains' points from a Prometheus server, as :meth:`History.points
    <virt_balloon_stats.history.History.points>` gives them from a file.

    :param url: The server's base URL (``http://prometheus:9090``, or with
        the path prefix it is served under).
    :param timeout: Seconds each query may take.
    :param opener: ``urllib``'s opener (the default one: proxies from the
        environment); another one for authentication.
    :raise InvalidArgument: For a URL that is not http(s).
    """

    def __init__(self, url: str, *, timeout: float = 30.0,
                 opener: Optional[urllib.request.OpenerDirector] = None) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise InvalidArgument(
                f"not a Prometheus URL: {url[:80]!r}; give http://HOST:PORT (9090 by default)"
            )
        self.url = url.rstrip("/")
        self._timeout = timeout
        self._opener = opener or urllib.request.build_opener()
        self._window: Optional[Tuple[float, float]] = None
        self._points: Dict[str, List[Point]] = {}

    def points(self, uuid: str, since: float, until: float) -> List[Point]:
        """One domain's points that start in ``[since, until)``, oldest first; none for one Prometheus lacks.

        :raise HistoryError: When Prometheus cannot be asked, or answers with an error.
        """
        if self._window != (since, until):
            step = step_for(since, until)
            answers = {name: self._query(query.format(step=step), since + step, until, step)
                       for name, query in QUERIES.items()}
            self._points = points_from_answers(answers, step, self.url)
            self._window = (since, until)
        return [p for p in self._points.get(uuid, ()) if since <= p.start < until]

    def _query(self, query: str, start: float, end: float, step: int) -> Answer:
        """One range query; its matrix."""
        form = urllib.parse.urlencode({"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                       "step": str(step)}).encode()
        where = f"{self.url}/api/v1/query_range"
        try:
            with self._opener.open(urllib.request.Request(where, data=form), timeout=self._timeout) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as err:
            body = _error_body(err)
            if body is None:
                raise HistoryError(f"{where}: HTTP {err.code} {err.reason}", path=self.url) from err
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise HistoryError(f"{where}: Prometheus does not answer: {reason}", path=self.url) from err
        except ValueError as err:
            raise HistoryError(f"{where}: the answer is not JSON: {err}", path=self.url) from err
        if not isinstance(body, dict) or body.get("status") != "success":
            error = body.get("error") if isinstance(body, dict) else None
            detail = error if isinstance(error, str) else repr(body)
            raise HistoryError(f"{where}: Prometheus refused {query!r}: {detail}"[:400], path=self.url)
        data = body.get("data")
        if not isinstance(data, dict) or data.get("resultType") != "matrix" or not isinstance(
            data.get("result"), list
        ):
            raise HistoryError(f"{where}: the answer to {query!r} is not a matrix", path=self.url)
        result: Answer = data["result"]
        return result

    def close(self) -> None:
        """Forget the answers (nothing stays open between queries)."""
        self._window, self._points = None, {}

    def __enter__(self) -> PrometheusHistory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _error_body(err: urllib.error.HTTPError) -> Optional[Dict[str, Any]]:
    """Prometheus' JSON error document behind an HTTP error (a 400 for a bad query), if that is what it is."""
    try:
        body = json.loads(err.read())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and "status" in body else None
