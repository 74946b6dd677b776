"""Emulated small nodes for the scale-out benchmark: every process of a node capped at the same
share of a CPU through the cgroup v1 ``cpu`` controller (CFS bandwidth: ``cfs_quota_us`` of CPU
time per ``cfs_period_us``), one cgroup per node.

On a machine with fewer cores than nodes, uncapped workers share the cores and the scale-out
measures the machine, not the system; capped at 0.25 CPU each, four nodes need one core and
the store keeps the rest. Processes forked after :meth:`CpuCaps.cap` (pool processes a worker
replaces) inherit their parent's cgroup.

Where the controller is missing or not writable (not root, cgroup v2 only), nothing is capped and
``CpuCaps.unavailable`` says why; the benchmark then reports CPU-seconds instead
(:func:`cpu_seconds`), which it reports in every case.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path
from types import TracebackType

CPU_CONTROLLER = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_ATTEMPTS = 10


def _stat_fields(pid: int) -> list[str]:
    """``/proc/PID/stat`` from field 3 (state) on: the command name may hold spaces and ``)``."""
    return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it that runs now (zombies aside: they cannot
    join a cgroup)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry.name))
        except OSError:
            continue  # exited while we looked
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, []))
    return tree


def cpu_seconds(root: int) -> float:
    """User and system CPU-seconds of ``root``'s tree: of the processes running now, and of the
    children they have reaped (cutime, cstime; a live child is not in its parent's count yet)."""
    total = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += sum(int(field) for field in _stat_fields(pid)[11:15])
    return total / _CLOCK_TICKS


def host_steal_seconds() -> float:
    """CPU-seconds since boot that this machine's virtual CPUs were ready to run but the host ran
    something else (the ``steal`` column of ``/proc/stat``, every CPU); 0 where not reported. A
    run that lost much of it did not measure a quiet machine."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        with open("/proc/stat") as f:
            fields = f.readline().split()
        if fields[0] == "cpu":
            return int(fields[8]) / _CLOCK_TICKS
    return 0.0


class CpuCaps:
    """One cgroup per node under :data:`CPU_CONTROLLER`, each with a quota of ``cpus`` CPUs,
    removed on :meth:`close` (its processes go back to the root cgroup first, so this works
    whether or not they still run). ``cpus`` 0 caps nothing."""

    def __init__(self, cpus: float, controller: Path = CPU_CONTROLLER) -> None:
        self.cpus = cpus
        self.controller = controller
        self.groups: dict[str, Path] = {}
        self.unavailable: str | None = None
        if cpus > 0 and not (controller / "cpu.cfs_quota_us").is_file():
            self.unavailable = f"no cgroup v1 cpu controller at {controller}"

    @property
    def applied(self) -> bool:
        return self.cpus > 0 and self.unavailable is None

    def cap(self, node: str, root: int) -> None:
        """Move ``root``'s process tree into the node's cgroup."""
        if not self.applied:
            return
        group = self.controller / f"compactor-bench-{os.getpid()}-{node}"
        try:
            group.mkdir()
            self.groups[node] = group
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(round(self.cpus * PERIOD_US)))
        except OSError as err:
            self.unavailable = f"cgroup {group} not writable: {err}"
            self.close()
            return
        # A process forked while we move its parent may have been listed before it existed:
        # walk the tree again until every process in it is in the cgroup.
        for _ in range(_ATTEMPTS):
            missing = set(process_tree(root)) - self._members(group)
            if not missing:
                return
            for pid in missing:
                self._move(group, pid)
        raise RuntimeError(f"processes of {node} not in {group} after {_ATTEMPTS} attempts: {sorted(missing)}")

    def throttling(self) -> dict[str, dict[str, int]]:
        """Each node's ``cpu.stat``: periods, throttled periods and throttled nanoseconds."""
        out = {}
        for node, group in self.groups.items():
            lines = (group / "cpu.stat").read_text().split("\n")
            out[node] = {name: int(value) for name, value in (line.split() for line in lines if line)}
        return out

    @staticmethod
    def _members(group: Path) -> set[int]:
        return {int(pid) for pid in (group / "cgroup.procs").read_text().split()}

    @staticmethod
    def _move(group: Path, pid: int) -> None:
        try:
            (group / "cgroup.procs").write_text(str(pid))
        except ProcessLookupError:
            pass  # exited meanwhile
        except OSError as err:
            if err.errno != errno.ESRCH:
                raise

    def close(self) -> None:
        for group in self.groups.values():
            for pid in self._members(group):
                self._move(self.controller, pid)
            deadline = time.monotonic() + 5
            while True:
                try:
                    group.rmdir()
                    break
                except OSError as err:
                    # EBUSY while a process moved out is still being accounted for.
                    if err.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        self.groups.clear()

    def __enter__(self) -> CpuCaps:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
