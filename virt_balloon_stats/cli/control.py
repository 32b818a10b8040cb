"""Polling control: ``period``, ``enable``, ``disable`` and ``rearm``.

Each sets QEMU's guest-stats polling interval (through libvirt, or
``qom-set`` with ``--via qmp``) and reads it back; ``period`` without
SECONDS only shows it. They need a read-write connection.
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from virt_balloon_stats.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    AddCommand,
    Run,
    UsageError,
    add_domains,
    add_grace,
    add_timeout,
)
from virt_balloon_stats.errors import BalloonStatsError
from virt_balloon_stats.formats import render_json, render_table
from virt_balloon_stats.host import Guest
from virt_balloon_stats.polling import ROUTES, PollingState, validate_interval
from virt_balloon_stats.sample import Sample
from virt_balloon_stats.stats import Status

__all__ = ["DEFAULT_ENABLE_PERIOD", "add_parsers", "cmd_period", "cmd_enable", "cmd_disable", "cmd_rearm"]

#: Interval ``enable`` sets when none is given (what virt-manager uses).
DEFAULT_ENABLE_PERIOD = 5


def _period_targets(args: argparse.Namespace) -> Tuple[List[str], Optional[str]]:
    """``period DOM... [SECONDS]``: a trailing number after a domain is SECONDS."""
    words = list(args.words)
    seconds = args.set
    # Any number, even a bad one (-1, 1.5), is meant as SECONDS: it must be
    # refused as an interval, not looked up as a domain name.
    if seconds is None and len(words) > 1 and re.fullmatch(r"[-+]?[0-9]+(\.[0-9]*)?", words[-1]):
        seconds = words.pop()
    return words, seconds


def _polling_row(uri: str, guest: Guest, state: PollingState, via: Optional[str]) -> Dict[str, Any]:
    row: Dict[str, Any] = {"uri": uri, "domain": guest.name, "uuid": guest.uuid}
    if via:
        row["via"] = via
    row.update(state.to_dict())
    return row


def _secs(value: Optional[int]) -> str:
    return "-" if value is None else f"{value} s"


def _set_or_show(run: Run, seconds: Optional[int]) -> int:
    args = run.args
    rows: List[Dict[str, Any]] = []
    for client in run.clients():
        for guest in run.guests(client):
            try:
                if seconds is None:
                    state = client.polling(guest)
                else:
                    live, config = args.live, args.config
                    if not live and not config:  # virsh's --current
                        live, config = guest.id is not None, guest.id is None
                    state = client.set_polling_interval(
                        guest, seconds, via=args.via, live=live, config=config
                    )
            except BalloonStatsError as err:
                run.report(guest.name, client.host.uri, err)
                continue
            rows.append(
                _polling_row(client.host.uri, guest, state, args.via if seconds is not None else None)
            )
    if args.format == "json":
        run.write(render_json(rows))
    elif rows:
        name = (lambda r: f"{r['domain']}@{r['uri']}") if run.several_hosts else (lambda r: r["domain"])
        if seconds is None:
            header: Tuple[str, ...] = ("DOMAIN", "QEMU INTERVAL", "LIBVIRT PERIOD", "DRIFT")
            table: List[Tuple[str, ...]] = [
                (
                    name(r),
                    _secs(r["polling_interval"]),
                    _secs(r["libvirt_period"]),
                    "yes" if r["drift"] else "no",
                )
                for r in rows
            ]
        else:
            header = ("DOMAIN", "VIA", "BEFORE", "QEMU NOW", "LIBVIRT PERIOD", "DRIFT")
            table = [
                (
                    name(r),
                    r["via"],
                    _secs(r["changed_from"]),
                    _secs(r["polling_interval"]),
                    _secs(r["libvirt_period"]),
                    "yes" if r["drift"] else "no",
                )
                for r in rows
            ]
        run.write(render_table(header, table))
        drifting = [r for r in rows if r["drift"]]
        for r in drifting:
            run.write(f"{name(r)}: {r['message']}")
    return EXIT_FAILED if run.failed else EXIT_OK


def cmd_period(run: Run) -> int:
    """Show, or set and read back, the polling interval."""
    domains, seconds = _period_targets(run.args)
    if not domains:
        raise UsageError("name at least one domain")
    run.args.domains = domains
    if seconds is None and (run.args.live or run.args.config):
        raise UsageError("--live and --config apply when setting; give SECONDS")
    return _set_or_show(run, None if seconds is None else validate_interval(seconds, via=run.args.via))


def cmd_enable(run: Run) -> int:
    """Turn polling on (default every 5 s)."""
    return _set_or_show(run, validate_interval(run.args.period, via=run.args.via))


def cmd_disable(run: Run) -> int:
    """Turn polling off (interval 0)."""
    return _set_or_show(run, 0)


def cmd_rearm(run: Run, sleep: Callable[[float], None] = time.sleep) -> int:
    """Re-arm the stats timer of stale domains, then show whether they answer again."""
    from virt_balloon_stats.facade import sample_many

    args = run.args
    results: List[Dict[str, Any]] = []
    for client in run.clients():
        before = sample_many(client, run.guests(client), "qmp", timeout=args.timeout)
        rearmed: List[Tuple[Sample, PollingState]] = []
        for s in before:
            entry: Dict[str, Any] = {
                "uri": s.uri,
                "domain": s.domain,
                "uuid": s.uuid,
                "status_before": s.status.value,
                "last_update_before": s.last_update,
                "rearmed": False,
                "status_after": None,
                "last_update_after": None,
            }
            results.append(entry)
            if s.error is not None:
                run.report(s.domain, s.uri, s.error)
                continue
            if s.status is not Status.STALE and not args.force:
                entry["message"] = "nothing to re-arm (not stale; --force re-arms anyway)"
                continue
            try:
                state = client.rearm(s.uuid, via=args.via)
            except BalloonStatsError as err:
                run.report(s.domain, s.uri, err)
                entry["message"] = f"re-arm failed: {err}"
                continue
            entry["rearmed"] = True
            rearmed.append((s, state))
        if rearmed and args.wait:
            sleep(min(max(st.qemu_interval or 0 for _, st in rearmed) + 1.0, args.wait))
        for s, state in rearmed:
            after = client.sample(s.uuid, "qmp")
            entry = next(e for e in results if e["uuid"] == s.uuid and e["uri"] == s.uri)
            moved = after.last_update is not None and after.last_update != s.last_update
            entry.update(status_after=after.status.value, last_update_after=after.last_update)
            entry["message"] = f"re-armed the {state.qemu_interval} s timer via {args.via}; " + (
                "the guest answered again"
                if moved
                else "no answer yet: the guest's balloon driver is not responding (check the guest)"
            )
    if args.format == "json":
        run.write(render_json(results))
    else:
        for e in results:
            if "message" in e:
                where = f"@{e['uri']}" if run.several_hosts else ""
                change = (
                    f"{e['status_before']} -> {e['status_after']}" if e["rearmed"] else e["status_before"]
                )
                run.write(f"{e['domain']}{where}: {change}: {e['message']}")
    return EXIT_FAILED if run.failed else EXIT_OK


def _setting(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--via",
        choices=ROUTES,
        default="libvirt",
        help="libvirt: setMemoryStatsPeriod, keeps libvirt's XML true (default); "
        "qmp: qom-set guest-stats-polling-interval",
    )
    parser.add_argument("--live", action="store_true", help="change the running domain")
    parser.add_argument(
        "--config",
        action="store_true",
        help="change the persistent definition (libvirt route); "
        "neither flag: the running domain, or the definition if it is not running",
    )


def add_parsers(command: AddCommand) -> None:
    """``period``, ``enable``, ``disable`` and ``rearm``, with their options."""
    p = command(
        "period",
        cmd_period,
        "show or set the polling interval",
        "Without SECONDS, show QEMU's live interval, libvirt's <stats period> and any drift. "
        "With SECONDS (0 disables), set it and read QEMU's value back. A trailing number "
        "after at least one domain is SECONDS; use --set when that is ambiguous.",
        examples=("period web1", "period web1 db1 10", "period --via qmp web1 0", "period --config web1 5"),
        read_write=True,
    )
    p.add_argument(
        "words",
        nargs="+",
        metavar="DOMAIN",
        help="domain name, UUID or id; a number after the last is SECONDS",
    )
    p.add_argument("--set", metavar="SECONDS", help="the interval to set, in whole seconds (0 disables)")
    _setting(p)

    p = command(
        "enable",
        cmd_enable,
        "turn stats polling on",
        f"Set the polling interval (default {DEFAULT_ENABLE_PERIOD} s) and read it back.",
        examples=("enable web1", "enable --period 10 web1 db1"),
        read_write=True,
    )
    add_domains(p, all_allowed=False)
    p.add_argument(
        "--period",
        default=DEFAULT_ENABLE_PERIOD,
        metavar="N",
        help=f"interval in seconds (default: {DEFAULT_ENABLE_PERIOD})",
    )
    _setting(p)

    p = command(
        "disable",
        cmd_disable,
        "turn stats polling off",
        "Set the polling interval to 0; QEMU stops asking the guest, the last figures stay.",
        examples=("disable web1",),
        read_write=True,
    )
    add_domains(p, all_allowed=False)
    _setting(p)

    p = command(
        "rearm",
        cmd_rearm,
        "re-arm the stats timer of stale domains",
        "QEMU re-arms its stats timer only when the guest answers. For each stale domain, "
        "set the same interval again (which re-arms it), wait one interval, and report "
        "whether the guest answered.",
        examples=("rearm --all", "rearm --force web1"),
        read_write=True,
    )
    add_domains(p)
    add_grace(p)
    add_timeout(p)
    p.add_argument("--via", choices=ROUTES, default="libvirt", help="route for the re-set (default: libvirt)")
    p.add_argument("--force", action="store_true", help="re-arm every named domain, stale or not")
    p.add_argument(
        "--wait",
        type=float,
        default=30.0,
        metavar="S",
        help="longest wait for the guest to answer, 0 to not wait (default: 30)",
    )
