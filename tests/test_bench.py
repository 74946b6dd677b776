"""The benchmark's emulated nodes (bench.cgroups) and the scale-out workloads' layer maps."""

import os
import subprocess
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from bench.cgroups import CPU_CONTROLLER, CpuCaps, cpu_seconds, process_tree
from bench.run import check_targets, render_scale_out, scale_spec
from compactor.coordinator.local.workload import KEY_BASE, preset
from compactor.coordinator.local.workload import generate as generate_workload
from compactor.storage.keys import key_from_int
from compactor.storage.object_store import ObjectStore
from compactor.storage.settings import Settings
from compactor.storage.timeline import Storage
from compactor.worker.engine.jobs import CompactionJob
from compactor.worker.engine.kinds import plan_any
from compactor.worker.engine.l0 import L0Plan


@pytest.fixture
def busy_tree() -> Iterator[subprocess.Popen[bytes]]:
    """A shell with a busy child and a sleeping one."""
    proc = subprocess.Popen(["bash", "-c", "(while :; do :; done) & (sleep 60) & wait"], start_new_session=True)
    deadline = time.monotonic() + 5
    while len(process_tree(proc.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    yield proc
    os.killpg(proc.pid, 9)
    proc.wait()


def test_process_tree_and_its_cpu_seconds(busy_tree: subprocess.Popen[bytes]) -> None:
    tree = process_tree(busy_tree.pid)
    assert len(tree) == 3 and tree[0] == busy_tree.pid
    before = cpu_seconds(busy_tree.pid)
    time.sleep(0.3)
    assert cpu_seconds(busy_tree.pid) > before


def test_without_the_controller_nothing_is_capped_and_the_reason_is_given(
    tmp_path: Path, busy_tree: subprocess.Popen[bytes]
) -> None:
    with CpuCaps(0.25, controller=tmp_path / "cpu") as caps:
        caps.cap("node-1", busy_tree.pid)
        assert not caps.applied and caps.groups == {}
        assert caps.unavailable is not None and "no cgroup v1 cpu controller" in caps.unavailable
    assert CpuCaps(0).unavailable is None and not CpuCaps(0).applied


@pytest.mark.skipif(not os.access(CPU_CONTROLLER, os.W_OK), reason="cgroup v1 cpu controller not writable")
def test_a_node_tree_is_capped_and_its_cgroup_removed(busy_tree: subprocess.Popen[bytes]) -> None:
    with CpuCaps(0.25) as caps:
        caps.cap("node-1", busy_tree.pid)
        group = caps.groups["node-1"]
        assert (group / "cpu.cfs_quota_us").read_text().strip() == "25000"
        assert set((group / "cgroup.procs").read_text().split()) == {str(p) for p in process_tree(busy_tree.pid)}
        before = cpu_seconds(busy_tree.pid)
        time.sleep(1.0)
        # The busy child alone would take a whole CPU.
        assert cpu_seconds(busy_tree.pid) - before < 0.5
        assert caps.throttling()["node-1"]["nr_throttled"] > 0
    assert not group.exists()


def test_bands_and_image_layers_are_cut_at_their_own_keys(s3_settings: Settings, object_store: ObjectStore) -> None:
    """Not a partitioned keyspace: no key inside the timeline is a cut of every layer stack."""
    spec = preset("pages", 3 << 20, layer_bytes=256 << 10)
    manifest = generate_workload(Storage(s3_settings), "b" * 32, "a" * 32, spec, workdir=s3_settings.cache_dir)
    stacks: dict[tuple[int, int], set[bytes]] = {}
    for entry in manifest.layers.values():
        layer = entry.layer
        stacks.setdefault((layer.lsn_start, layer.lsn_end), set()).add(layer.key_range.start)
    assert len(stacks) == 1 + spec.bands and all(len(starts) > 2 for starts in stacks.values())
    shared = set.intersection(*stacks.values()) - {key_from_int(KEY_BASE)}
    assert not shared


def test_the_l0_scale_out_timeline_is_one_run_of_ten_l0s(s3_settings: Settings, object_store: ObjectStore) -> None:
    """``--scale-kind l0``: every layer an L0 delta, LSN-contiguous, all of them one L0 run that
    meets ``compaction_threshold`` without forcing, nothing left pending."""
    spec = scale_spec("l0", 3 << 20)
    manifest = generate_workload(Storage(s3_settings), "b" * 32, "c" * 32, spec, workdir=s3_settings.cache_dir)
    layers = sorted((e.layer for e in manifest.layers.values()), key=lambda layer: layer.lsn_start)
    assert len(layers) == 10 and all(layer.is_l0 for layer in layers)
    assert all(a.lsn_end == b.lsn_start for a, b in pairwise(layers))
    plan = plan_any(manifest, CompactionJob(tenant_id="b" * 32, timeline_id="c" * 32, kind="l0"))
    assert isinstance(plan, L0Plan) and len(plan.selected) == 10 and not plan.pending


def test_scale_out_tables_render_runs_from_before_the_store_was_measured() -> None:
    """Results files written before the S3 server's CPU and the idle tail were measured still
    render, with a dash where those were not measured."""
    sub = {"seconds": 5.0, "kv_bytes": 156e6, "download_wait_s": 1.0}
    old = {
        "workers": 1, "sub_jobs": 1, "most_at_once": 1, "wall_s": 5.0, "mb_s": 200.0, "speedup": 1.0,
        "efficiency": 1.0, "plan_s": 0.1, "finalize_s": 0.1, "node_downloaded_bytes": {"node-1": 1e9},
        "node_cpu_s": {"node-1": 1.2}, "load_average": 1.0, "cpu_cap": True, "cpu_cap_unavailable": None,
        "subs": [sub],
    }  # fmt: skip
    new = {**old, "workers": 2, "s3_cpu_s": 6.4, "idle_tail_s": 0.3}
    scale = {"size": 1 << 30, "layers": 10, "cpus_per_worker": 0.25, "command": "c", "date": "d", "commit": "x"}
    lines = render_scale_out("l0", {**scale, "runs": [old, new]})
    assert "L0 compaction" in lines[0]
    assert lines[-3].endswith("| 1.0 | - | 1000 | 1 | - | 1.00 |")
    assert lines[-2].endswith("| 1.0 | 0.3 | 1000 | 1 | 6 | 1.00 |")


def test_target_lines_say_what_the_host_took_during_the_runs() -> None:
    """A ratio's line tells how much CPU the host gave other guests during the reported runs,
    where that was measured; results from before it was render as they did."""

    def run(wall: float, steal: float | None) -> dict[str, float]:
        measured = {"wall_s": wall, "mb_s": 235 / wall, "input_bytes": 235e6, "cpu_s": 2.5, "s3_cpu_s": 2.0}
        return measured if steal is None else {**measured, "host_steal_s": steal}

    def workload(steal: tuple[float, float] | None) -> dict[str, Any]:
        compaction, copy = run(4.0, steal and steal[0]), run(3.2, steal and steal[1])
        return {"workload": "pages", "compaction": compaction, "copy_through": copy, "ratio": 0.8}

    results: dict[str, Any] = {"meta": {"machine": {"nproc": 2}}, "growth": []}
    lines = check_targets({**results, "workloads": [workload((0.7, 0.05))]})
    assert lines[0] == (
        "FAIL pages: 0.80 of copy-through (target >= 0.9; the cores allow 1.42; "
        "host steal: 0.70 s in the compaction, 0.05 s in the copy-through)"
    )
    assert check_targets({**results, "workloads": [workload(None)]})[0] == (
        "FAIL pages: 0.80 of copy-through (target >= 0.9; the cores allow 1.42)"
    )


def test_kinds_benchmark_measures_l0_and_image_against_copy_through(tmp_path: Path) -> None:
    """``python -m bench --kinds`` on a tiny timeline: every kind and its copy-through run in
    their own processes; the results join the other sections of the JSON and of the table."""
    import json
    import shutil
    import sys

    docs = Path(__file__).resolve().parent.parent / "docs"
    results, markdown = tmp_path / "benchmarks.json", tmp_path / "benchmarks.md"
    shutil.copy(docs / "benchmarks.json", results)
    shutil.copy(docs / "benchmarks.md", markdown)
    before = json.loads(results.read_text())
    bench = [sys.executable, "-m", "bench"]
    args = ["--kinds", "l0,image", "--kinds-size", "600K", "--l0-size", "256K", "--dir", str(tmp_path / "scratch"),
            "--json", str(results), "--markdown", str(markdown)]  # fmt: skip
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPACTOR_")}
    proc = subprocess.run([*bench, *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kinds = json.loads(results.read_text())["kinds"]
    assert [row["kind"] for row in kinds["runs"]] == ["l0", "image"]
    assert kinds["timeline"]["l0s"] >= 2 and kinds["timeline"]["l0_bytes"] >= 600 * 1024
    for row in kinds["runs"]:
        assert row["compaction"]["mb_s"] > 0 and row["copy_through"]["mb_s"] > 0
        assert row["compaction"]["input_bytes"] == row["copy_through"]["input_bytes"] > 0
    assert {k: v for k, v in json.loads(results.read_text()).items() if k != "kinds"} == {
        k: v for k, v in before.items() if k != "kinds"
    }
    text = markdown.read_text()
    assert "**L0 compaction and image creation**" in text and "| l0 | " in text and "| image | " in text
    assert (
        text.split("<!-- bench-results:end -->")[1]
        == (docs / "benchmarks.md").read_text().split("<!-- bench-results:end -->")[1]
    ), "the hand-written sections stay as they are"
    usage = subprocess.run([*bench, "--kinds", "gc"], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "--kinds takes l0, image" in usage.stderr
