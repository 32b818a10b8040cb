"""One-shot reads: ``stats``, ``path`` and ``check``.

Each reads its domains once and exits. One domain on one host is read as a
script would (:meth:`BalloonStats.sample` within ``--timeout``); several
domains, several hosts or ``--all`` take one collector cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Tuple

from virt_balloon_stats.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    FORMATS,
    OWN_OUTPUT,
    AddCommand,
    Run,
    add_domains,
    add_grace,
    add_source,
    add_timeout,
    positive,
)
from virt_balloon_stats.client import DEFAULT_TIMEOUT
from virt_balloon_stats.errors import BalloonStatsError
from virt_balloon_stats.formats import render_json, render_stats, render_table
from virt_balloon_stats.sample import Sample

if TYPE_CHECKING:  # imported where used: a one-domain reading needs no collector
    from virt_balloon_stats.collector import Cycle, Totals

__all__ = ["add_parsers", "cmd_stats", "cmd_path", "cmd_check"]


def _one_cycle(run: Run) -> Tuple[Cycle, Totals]:
    """One collector cycle: every domain within ``--timeout``, the failures reported."""
    collector = run.collector()
    try:
        cycle = collector.collect()
    finally:
        collector.stop()
    run.report_cycle(cycle)
    return cycle, collector.totals


def _sample_all(run: Run) -> List[Sample]:
    """The samples of the command's domains, the failures reported."""
    args = run.args
    if len(run.uris) > 1 or getattr(args, "all", False) or len(args.domains) != 1:
        return list(_one_cycle(run)[0].samples)
    # One domain on one host: read as a script would, within the same
    # deadline; a collector's threads and bulk calls only pay off for several.
    samples: List[Sample] = []
    for client in run.clients():
        for guest in run.guests(client):
            source = getattr(args, "source", "both")
            sample = client.sample(guest, source, timeout=args.timeout or DEFAULT_TIMEOUT)
            if sample.error is not None:
                run.report(sample.domain, sample.uri, sample.error)
            samples.append(sample)
    return samples


def cmd_stats(run: Run) -> int:
    """Print every figure of the domains, with libvirt's beside it."""
    fmt = run.args.format
    if fmt == "prometheus" or run.args.textfile:
        from virt_balloon_stats import metrics  # needs the 'exporter' extra

        cycle, totals = _one_cycle(run)
        if run.args.textfile:
            metrics.write_textfile(run.args.textfile, cycle, totals)
        else:
            run.write(metrics.render(cycle, totals))
        return EXIT_FAILED if run.failed else EXIT_OK
    samples = _sample_all(run)
    if fmt == "json":
        run.write(render_json([s.to_dict() for s in samples]))
    else:
        run.write(render_stats(samples, raw_bytes=run.args.bytes, show_uri=run.several_hosts))
    return EXIT_FAILED if run.failed else EXIT_OK


def cmd_path(run: Run) -> int:
    """Show where each balloon lives in QOM and how it was found."""
    rows: List[Dict[str, Any]] = []
    for client in run.clients():
        for guest in run.guests(client):
            try:
                path = client.qom_path(guest)
            except BalloonStatsError as err:
                run.report(guest.name, client.host.uri, err)
                continue
            rows.append(
                {
                    "uri": client.host.uri,
                    "domain": guest.name,
                    "uuid": guest.uuid,
                    "qom_path": path.path,
                    "qom_type": path.qom_type,
                    "method": path.method,
                    "detail": path.detail,
                }
            )
    if run.args.format == "json":
        run.write(render_json(rows))
    elif rows:
        run.write(
            render_table(
                ("DOMAIN", "QOM PATH", "QOM TYPE", "FOUND BY"),
                [
                    (
                        r["domain"] + (f"@{r['uri']}" if run.several_hosts else ""),
                        r["qom_path"],
                        r["qom_type"],
                        r["method"],
                    )
                    for r in rows
                ],
            )
        )
    return EXIT_FAILED if run.failed else EXIT_OK


def cmd_check(run: Run) -> int:
    """Nagios / Icinga plugin: one status line, perfdata, exit 0-3."""
    from virt_balloon_stats.nagios import State, render_check  # each command imports its own

    samples = _sample_all(run)
    if run.failed and not samples:
        run.write(f"BALLOON UNKNOWN - no domain could be checked: {run.first_error}")
        return int(State.UNKNOWN)
    if not samples:
        run.write("BALLOON OK - no running domain")
        return int(State.OK)
    state, text = render_check(samples, run.args.max_age)
    if run.failed and state is State.OK:
        state = State.UNKNOWN
        text = text.replace("BALLOON OK -", f"BALLOON UNKNOWN - {run.first_error};", 1)
    run.write(text)
    return int(state)


def add_parsers(command: AddCommand) -> None:
    """``stats``, ``path`` and ``check``, with their options."""
    p = command(
        "stats",
        cmd_stats,
        "balloon figures, beside libvirt's",
        "Show every guest-stats figure of each domain with libvirt's memoryStats value beside "
        "it, the status, the age of the figures and the cross-check verdict.",
        examples=(
            "stats web1",
            "stats --all --format json",
            "stats -c qemu:///system -c qemu+tcp://hv2/system --all",
            "stats --source libvirt -r web1",
        ),
        formats=FORMATS,
    )
    add_domains(p)
    add_source(p)
    add_grace(p)
    add_timeout(p)
    p.add_argument(
        "--bytes", action="store_true", help="raw numbers (bytes, and libvirt's KiB) instead of MiB/GiB"
    )
    p.add_argument(
        "--textfile",
        metavar="PATH",
        help="write the Prometheus format to PATH, replaced atomically (node_exporter's textfile "
        "collector); prints nothing",
    )

    p = command(
        "path",
        cmd_path,
        "the balloon's QOM path",
        "Show the balloon device's QOM path, its QOM type, and how it was found "
        "(by its alias under /machine/peripheral, or by searching the QOM tree).",
        examples=("path web1",),
        read_write=True,
    )
    add_domains(p)

    p = command(
        "check",
        cmd_check,
        "Nagios/Icinga check (exit 0-3)",
        "Monitoring-plugin check: one status line with performance data; exit 0 OK, "
        "1 WARNING, 2 CRITICAL, 3 UNKNOWN. stale, unresponsive and --max-age: CRITICAL; "
        "never_updated, polling_disabled, cross-check mismatch: WARNING; no_balloon, "
        "unreachable: UNKNOWN; ok, paused: OK. It ends within --timeout whatever one QEMU does.",
        examples=("check --all", "check --max-age 60 web1 db1"),
        formats=OWN_OUTPUT,
    )
    add_domains(p)
    add_source(p)
    add_grace(p)
    add_timeout(p)
    p.add_argument(
        "--max-age", type=positive, metavar="S", help="CRITICAL when figures are older than S seconds"
    )
