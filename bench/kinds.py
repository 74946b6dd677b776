"""L0 compaction and image creation on one worker against copy-through:
``python -m bench --kinds l0,image [--kinds-size 1G] [--l0-size 128M] [--repeat N]``.

The timeline is what a pageserver leaves before any compaction: image layers of its pages at
the start and L0 deltas flushed every ``--l0-size`` raw bytes (``checkpoint_distance``) on top, at
least ``--kinds-size`` of them as stored (``compactor.coordinator.local.ingest``). Each kind runs
as ``bench.run`` runs gc-compaction: one job inline in a fresh process with a cold cache
(``bench.job``: plan, download, compute, upload, commit), then the copy-through of the same
input layers; the timeline is reset between runs. Input is the layers the kind's plan reads:
the L0 run for ``l0``, every layer at or below the image LSN for ``image``.

Results go into the ``kinds`` section of ``docs/benchmarks.json`` (the other sections are kept)
and the generated table of ``docs/benchmarks.md`` (``bench.run.render``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench.run import (
    MB,
    MIB,
    ROOT,
    TENANT,
    Bench,
    _median_run,
    _timeline_id,
    git_commit,
    load_average,
    parse_size,
    render,
    update_markdown,
)
from compactor.coordinator.local.ingest import Ingest, IngestSpec
from compactor.storage.manifest import Manifest, TimelineSettings
from compactor.worker.engine.jobs import CompactionJob
from compactor.worker.engine.kinds import plan_any

KINDS = ("l0", "image")


def ingest_spec(l0_bytes: int) -> IngestSpec:
    """Pages written mostly whole (full-page images after a checkpoint, new pages), the rest WAL
    records, over enough pages that one L0 touches each at most about once (32768 for L0s of
    128 MiB); no model of the reads (nothing here verifies them)."""
    keys = max(1024, l0_bytes // 4096)
    return IngestSpec(keys=keys, l0_bytes=l0_bytes, batches=4, new_pages=0.05, images=0.5, model=False)


def l0_timeline(bench: Bench, size: int, l0_bytes: int) -> tuple[Manifest, float]:
    """A new timeline of image layers and L0s until the L0s hold ``size`` bytes; and how long
    writing it took."""
    assert bench.storage is not None
    spec = ingest_spec(l0_bytes)
    timeline = _timeline_id("kinds", size, spec.model_dump_json())
    # Every L0 in one run whatever their number (the byte bound, 2.5 GiB here, still applies).
    settings = TimelineSettings(checkpoint_distance=l0_bytes, compaction_threshold=2)
    start = time.perf_counter()
    ingest = Ingest.start(bench.storage, TENANT, timeline, spec, settings, workdir=bench.dir / "generate")
    while sum(entry.size for entry in ingest.flushed) < size:
        ingest.flush()
    return bench.storage.manifest(TENANT, timeline), time.perf_counter() - start


def measure_kinds(bench: Bench, kinds: list[str], size: int, l0_bytes: int, repeat: int) -> dict[str, Any]:
    manifest, gen_s = l0_timeline(bench, size, l0_bytes)
    l0s = [e for e in manifest.layers.values() if e.layer.is_l0]
    bench.log(f"  generated {len(l0s)} L0s of {sum(e.size for e in l0s) / MB:.0f} MB over "
              f"{sum(e.size for e in manifest.layers.values()) / MB:.0f} MB of layers in {gen_s:.1f}s")  # fmt: skip
    bench.warm_up(manifest, "kinds", kind=kinds[0])
    rows = []
    for kind in kinds:
        plan = plan_any(manifest, CompactionJob(tenant_id=TENANT, timeline_id=manifest.timeline_id, kind=kind))
        if isinstance(plan, str):
            raise RuntimeError(f"{kind}: nothing to do on the generated timeline: {plan}")
        # An image job's statistics count no input layers: its input is what its plan reads.
        input_bytes = sum(entry.size for entry in plan.selected)
        runs: dict[str, list[dict[str, Any]]] = {"compact": [], "copy": []}
        for r in range(repeat):
            for mode in runs:
                result = bench.run_job(mode, bench.reset(manifest), f"{kind}-{mode}-{r}", kind=kind)
                result["input_bytes"], result["input_layers"] = input_bytes, len(plan.selected)
                result["mb_s"] = input_bytes / MB / result["wall_s"]
                bench.log(f"    {kind} {mode}: {result['mb_s']:.1f} MB/s ({result['wall_s']:.1f}s)")
                runs[mode].append(result)
        bench.reset(manifest)
        compaction, copy = _median_run(runs["compact"]), _median_run(runs["copy"])
        ratio = compaction["mb_s"] / copy["mb_s"]
        rows.append({"kind": kind, "compaction": compaction, "copy_through": copy, "ratio": ratio})
    return {
        "timeline": {
            "layers": len(manifest.layers),
            "bytes": sum(e.size for e in manifest.layers.values()),
            "l0s": len(l0s),
            "l0_bytes": sum(e.size for e in l0s),
            "spec": ingest_spec(l0_bytes).model_dump(),
            "generate_s": gen_s,
        },
        "runs": rows,
    }


def render_kinds(kinds: dict[str, Any]) -> list[str]:
    """The section of the generated table (``bench.run.render``)."""
    t = kinds["timeline"]
    lines = [
        f"**L0 compaction and image creation** of one worker process: a timeline of {t['l0s']} L0s "
        f"({t['l0_bytes'] / MB:.0f} MB, each flushed at {t['spec']['l0_bytes'] / MIB:g} MiB of raw WAL, the "
        f"timeline's `checkpoint_distance`) over image layers of {t['spec']['keys']} pages, "
        f"{t['bytes'] / MB:.0f} MB in all (`coordinator/local/ingest.py`). One job of each kind inline, cold "
        "cache (download + compute + upload + commit), against the copy-through of the same input layers; "
        "input is what the kind reads: the L0 run for `l0`, every layer for `image` (it reads every key at the "
        "top through all of them). Medians of the runs.",
        "",
        f"Command: `{kinds['command']}` ({kinds['date']}, commit `{kinds['commit']}`, load average "
        f"{kinds['load_average_start'][0]:.2f} at the start).",
        "",
        "| kind | input layers | input MB | output layers | output MB | MB/s | copy-through MB/s | ratio | "
        "CPU s | VmHWM MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in kinds["runs"]:
        c, t = row["compaction"], row["copy_through"]
        lines.append(
            f"| {row['kind']} | {c['input_layers']} | {c['input_bytes'] / MB:.0f} | {c['output_layers']} | "
            f"{c['output_bytes'] / MB:.0f} | {c['mb_s']:.1f} | {t['mb_s']:.1f} | **{row['ratio']:.2f}** | "
            f"{c['cpu_s']:.1f} | {c['vmhwm_bytes'] / MIB:.0f} |"
        )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench --kinds", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", required=True, help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--kinds-size", default="1G", help="stored bytes of L0s to generate (default 1G)")
    parser.add_argument("--l0-size", default="128M", help="raw bytes of each L0: checkpoint_distance (default 128M)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each kind (the median is reported)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/compactor-bench-kinds"), help="scratch directory")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "benchmarks.json", help="results file")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md", help="table goes here")
    parser.add_argument("--no-write", action="store_true", help="print only; write no results files")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        parser.error(f"--kinds takes {', '.join(KINDS)}, not {', '.join(unknown) or 'nothing'}")
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    section: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "command": "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "load_average_start": load_average(),
    }
    bench = Bench(args.dir, verbose=False, profile_dir=None)
    bench.start()
    try:
        bench.log("L0 compaction and image creation:")
        section |= measure_kinds(bench, kinds, parse_size(args.kinds_size), parse_size(args.l0_size), args.repeat)
    finally:
        bench.stop()
        shutil.rmtree(args.dir, ignore_errors=True)
    section["load_average_end"] = load_average()
    print("\n".join(render_kinds(section)))
    if not args.no_write:
        # Beside the results of the other sections, which this run did not measure.
        results: dict[str, Any] = json.loads(args.json.read_text())
        results["kinds"] = section
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        update_markdown(args.markdown, render(results))
