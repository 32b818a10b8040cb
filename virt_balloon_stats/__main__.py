"""The ``virt-balloon-stats`` command's entry point; ``python -m virt_balloon_stats`` runs it too.

Start-up is most of what a one-shot command such as ``stats DOMAIN`` costs: about
50 ms of it goes to starting Python and importing libvirt and lxml, which no
command can avoid (``python -c "import libvirt, libvirt_qemu, lxml.etree"``). What
this module spares is the cyclic garbage collector's work on the objects start-up
creates and never frees (modules, classes, the parser): it runs over all of them
several times while the imports run and once more as the interpreter exits,
about 15 ms together, more than the libvirt calls a ``stats`` makes. So the
collector is off during start-up; :func:`virt_balloon_stats.cli.main` turns it
back on before a long-running command (``watch``, ``stream``, ``exporter``)
starts its loop, and what a one-shot command leaves is frozen, not scanned, at
exit. A one-shot command allocates little, so nothing piles up meanwhile.
"""

import gc
import sys


def main() -> int:
    """Run the command line with the collector off during start-up; returns the exit status."""
    gc.disable()
    from virt_balloon_stats.cli import main as run

    status = run()
    if not gc.isenabled():
        gc.freeze()
    return status


if __name__ == "__main__":
    sys.exit(main())
