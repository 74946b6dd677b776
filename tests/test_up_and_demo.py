"""`compactor up` and `compactor demo` as a user runs them: real processes, nothing left behind."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def parents() -> dict[int, int]:
    """The parent of every live process (by walking /proc)."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z":
                found[int(entry.name)] = int(fields[1])
    return found


def descendants(pid: int) -> set[int]:
    """Every live process whose ancestry includes ``pid``."""
    parents_now = parents()
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents_now.items() if parent in frontier} - out
        out |= frontier
    return out


def processes_in(directory: Path) -> list[str]:
    """Command lines mentioning ``directory`` (redis-server daemonizes away from its parent)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(directory) in cmd:
                found.append(cmd)
    return found


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "compactor.coordinator.cli.main", *args]


def wait_env_file(proc: subprocess.Popen[bytes], stack_dir: Path) -> dict[str, str]:
    """The settings in ``DIR/env`` once ``compactor up`` has written it."""
    deadline = time.monotonic() + 120
    while not (stack_dir / "env").exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "DIR/env never appeared"
        time.sleep(0.5)
    lines = (stack_dir / "env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line)


def test_up_writes_env_serves_and_stops_everything(tmp_path: Path) -> None:
    stack_dir = tmp_path / "stack"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPACTOR_")}
    proc = subprocess.Popen(cli("up", "--dir", str(stack_dir), "--workers", "2"), env=env, stderr=subprocess.PIPE)
    try:
        values = wait_env_file(proc, stack_dir)
        assert {"COMPACTOR_REDIS_URL", "COMPACTOR_S3_ENDPOINT_URL", "COMPACTOR_S3_BUCKET"} <= set(values)
        shell = f"set -a; . {stack_dir / 'env'}; {sys.executable} -m compactor.coordinator.cli.main jobs --json"
        out = subprocess.run(["bash", "-c", shell], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["jobs"] == []
        assert len(descendants(proc.pid)) >= 3  # workers and coordinator at least
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    time.sleep(0.5)
    assert processes_in(stack_dir) == [], "compactor up left processes behind"
    assert not (stack_dir / "env").exists()


def test_demo_runs_end_to_end_and_leaves_nothing(tmp_path: Path) -> None:
    work = tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPACTOR_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    (tmp_path / "compactor-demo").mkdir()  # an earlier demo's pictures stay as they are
    res = subprocess.run(
        cli("demo", "--size", "24MiB", "--max-job-size", "4MiB", "--dir", str(work), "--json"),
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert summary["sub_jobs"] >= 2 and summary["keys_verified"] > 0
    assert summary["layers_after"] <= summary["layers_before"]
    out_dir = tmp_path / "compactor-demo-2"
    assert (out_dir / "before.svg").read_text().startswith("<svg")
    assert (out_dir / "after.svg").read_text().startswith("<svg")
    assert not list(tmp_path.glob("*.svg")) and not list((tmp_path / "compactor-demo").iterdir())
    # stderr is not a terminal: progress comes as whole lines, and the summary starts on its own.
    lines = res.stderr.splitlines()
    progress = [line for line in lines if line.startswith(f"job {summary['job_id'][:8]} ")]
    assert progress and progress[-1].startswith(f"job {summary['job_id'][:8]} succeeded: sub-jobs ")
    assert all("MB of values merged" in line for line in progress)
    assert any(line.strip() == "gc-compaction summary" for line in lines), res.stderr[-2000:]
    assert any("MB/s of input layers" in line for line in lines)
    assert processes_in(work) == [], "the demo left processes behind"


def test_ingest_demo_runs_every_kind_on_its_own_and_verifies_every_read(tmp_path: Path) -> None:
    """The live pipeline, short: 12 small L0s (and a branch's) into real Redis, the moto server and
    prefork workers, with the coordinator's auto-trigger running l0, image and gc jobs.

    Nothing here depends on timing: flushes wait while 6 L0s are left (the pageserver's
    backpressure), so 12 L0s get through only because L0 compaction ran (at least twice: the
    demo ends once nothing is due, so with fewer than 2 L0s left); and with two L0 runs stacked,
    an image layer is due unless one was made, so the end state has made one."""
    work = tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPACTOR_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    args = ["--ingest", "--size", "2MiB", "--l0s", "12", "--l0-size", "256KiB", "--interval", "0.2",
            "--compaction-threshold", "2", "--image-creation-threshold", "2", "--l0-stall", "6",
            "--max-job-size", "256KiB", "--out", str(tmp_path / "maps"), "--dir", str(work), "--json"]  # fmt: skip
    res = subprocess.run(cli("demo", *args), env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary["l0s_ingested"] > 12 and summary["most_l0s"] <= 6
    assert summary["jobs"]["l0"] >= 2 and summary["l1_created"] >= 1
    assert summary["images_created"] >= 1
    assert summary["main"]["l0"] < 2 and summary["branch"]["l0"] < 2
    assert summary["keys_verified"] > 0 and summary["verified_lsns"] > 12
    lines = res.stderr.splitlines()
    assert sum(1 for line in lines if " main: L0 " in line) >= 12, res.stderr[-3000:]
    assert any(line.endswith("caught up") for line in lines)
    for name in ("before.svg", "after.svg"):
        assert (tmp_path / "maps" / name).read_text().startswith("<svg")
    assert processes_in(work) == [], "the demo left processes behind"
