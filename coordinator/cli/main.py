"""The ``compactor`` command line (README: Command line).

Machine-readable output goes to stdout; logs and progress to stderr. Every failure ends with a
one-line ``error: ...`` on stderr and a non-zero exit code.
"""

import json
from pathlib import Path
from typing import Any

import click

from compactor.coordinator.cli import logs
from compactor.coordinator.cli.common import (
    KEY,
    LSN,
    SIZE,
    OneLineUsageGroup,
    lsn_list,
    one_line_errors,
    settings_from,
    storage_from,
)
from compactor.storage.errors import CompactorError
from compactor.storage.keys import FULL_KEY_RANGE, KeyRange, format_key, key_next
from compactor.storage.timeline import Storage, layer_listing


@click.group(cls=OneLineUsageGroup)
@click.version_option(package_name="compactor", prog_name="compactor")
@click.option(
    "--env-file", type=click.Path(dir_okay=False, path_type=Path), help="read COMPACTOR_ settings from this file"
)
@click.pass_context
def main(ctx: click.Context, env_file: Path | None) -> None:
    """gc-compaction of layered page storage, as distributed jobs."""
    logs.configure()
    ctx.ensure_object(dict)
    ctx.obj["env_file"] = env_file


@main.command("up")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True)
@click.pass_context
@one_line_errors
def up(ctx: click.Context, directory: Path, workers: int) -> None:
    """Run the embedded stack (Redis, S3 endpoint, workers, coordinator) until SIGINT/SIGTERM.

    Every process gets the COMPACTOR_* settings given here (environment, --env-file), but the
    stack's own Redis, S3 endpoint and cache. DIR/env is written once everything answers:
    `set -a; . DIR/env` configures another shell."""
    import os
    import signal
    import threading

    from dotenv import dotenv_values

    from compactor.coordinator.local.embedded import EmbeddedStack

    settings_from(ctx)  # a missing env file or an invalid setting fails here, in one line
    env_file_given = ctx.obj.get("env_file") if ctx.obj else None
    # The environment wins over the file, as it does for Settings.
    given = {**(dotenv_values(env_file_given) if env_file_given else {}), **os.environ}
    settings = {k: v for k, v in given.items() if k.startswith("COMPACTOR_") and v is not None}

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    env_file = directory / "env"
    env_file.unlink(missing_ok=True)
    with EmbeddedStack(directory, workers=workers, coordinator=True, settings=settings) as stack:
        stack.write_env(env_file)
        click.echo(f"ready: {workers} workers; configure a shell with: set -a; . {env_file}", err=True)
        while not stop.wait(1.0):
            dead = [name for name, proc in stack.workers.items() if not proc.alive()]
            if dead:
                click.echo(f"worker {dead[0]} exited; stopping", err=True)
                break
        click.echo("stopping", err=True)
    env_file.unlink(missing_ok=True)


@main.command("demo")
@click.option(
    "--size",
    type=SIZE,
    default=None,
    help="approximate bytes of the timeline [default: 200MiB; with --ingest, 16MiB of pages to start from]",
)
@click.option("--workers", type=click.IntRange(1, 16), default=2, show_default=True)
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="folder for before.svg and after.svg [default: a new ./compactor-demo folder]",
)
@click.option("--max-job-size", type=SIZE, default="32MiB", show_default=True, help="sub-job size")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="keep the stack's files here (default: a temporary directory)",
)
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON on stdout")
@click.option(
    "--ingest",
    is_flag=True,
    help="the live pipeline: ingest L0s like a pageserver while the coordinator runs l0, image and gc jobs",
)
@click.option("--l0s", type=click.IntRange(2), default=None, help="--ingest: L0s to ingest [default: 30]")
@click.option(
    "--l0-size",
    type=SIZE,
    default=None,
    help="--ingest: raw bytes of each L0, the timeline's checkpoint_distance [default: 2MiB]",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0),
    default=None,
    help="--ingest: seconds from one L0 flush to the next [default: 2]",
)
@click.option(
    "--compaction-threshold",
    type=click.IntRange(1),
    default=None,
    help="--ingest: L0s that make L0 compaction due [default: 4]",
)
@click.option(
    "--image-creation-threshold",
    type=click.IntRange(1),
    default=None,
    help="--ingest: deltas above an image that make an image layer due [default: 6]",
)
@click.option(
    "--l0-stall",
    type=click.IntRange(1),
    default=None,
    help="--ingest: flushes wait while this many L0s are left [default: 3 x the compaction threshold]",
)
@one_line_errors
def demo(
    size: int | None,
    workers: int,
    out: Path | None,
    max_job_size: int,
    directory: Path | None,
    as_json: bool,
    ingest: bool,
    **ingest_options: float | None,
) -> None:
    """Build a realistic timeline, compact it through the workers, verify every retained read.

    With --ingest: keep ingesting L0 deltas (updates, new pages, a branch) while the
    coordinator's auto-trigger runs L0 compaction, image creation and gc-compaction on its own;
    a line per L0 flush on stderr, every read at every LSN verified at the end."""
    from rich.console import Console

    from compactor.coordinator.local.demo import IngestOptions, fresh_out_dir, run_demo

    given = {k: v for k, v in ingest_options.items() if v is not None}
    if given and not ingest:
        raise click.UsageError(f"--{next(iter(given)).replace('_', '-')} needs --ingest")
    names = {"l0_size": "l0_bytes", "interval": "interval_s", "l0_stall": "stall_l0s"}
    options = IngestOptions.model_validate({names.get(k, k): v for k, v in given.items()}) if ingest else None
    size = size if size is not None else (16 if ingest else 200) * 1024**2
    out_dir = out or fresh_out_dir(Path.cwd())
    summary = run_demo(size, workers, out_dir, directory, max_job_size, Console(stderr=True), options)
    if as_json:
        click.echo(json.dumps(summary))


@main.command("gc-orphans")
@click.option("--grace", "grace_s", type=click.FloatRange(min=0), default=None,
              help="seconds an unreferenced layer object must have existed before it is deleted "
                   "[default: COMPACTOR_ORPHAN_GRACE_S, 6 hours]")  # fmt: skip
@click.option("--keep-manifests", type=click.IntRange(1), default=10, show_default=True)
@click.option("--dry-run", is_flag=True, help="list what would be deleted, delete nothing")
@click.pass_context
@one_line_errors
def gc_orphans(ctx: click.Context, grace_s: float | None, keep_manifests: int, dry_run: bool) -> None:
    """Delete layer objects no manifest references (past the grace period and older than every
    in-flight job) and prune old manifests; prints a JSON report."""
    from compactor.coordinator.jobs.orphans import collect_orphans, inflight_from_records
    from compactor.worker.runtime.records import JobRecords
    from compactor.worker.runtime.redis_client import check_connectivity, connect

    settings = settings_from(ctx)
    storage = Storage(settings)
    check_connectivity(settings)
    report = collect_orphans(
        storage.objects,
        storage.manifests,
        grace_s=settings.orphan_grace_s if grace_s is None else grace_s,
        inflight=inflight_from_records(JobRecords(connect(settings))),
        keep_manifests=keep_manifests,
        dry_run=dry_run,
    )
    out = report.summary()
    if dry_run:
        out["would_delete"] = report.orphans
    click.echo(json.dumps(out))
    if report.errors:
        raise CompactorError(f"orphan cleanup had {len(report.errors)} error(s); first: {report.errors[0]}")


@main.group()
def timeline() -> None:
    """Import, export, read and inspect timelines."""


@timeline.command("import")
@click.argument("file", type=click.File("rb"))
@click.pass_context
@one_line_errors
def timeline_import(ctx: click.Context, file: Any) -> None:
    """Import a compactor.timeline/v1 document (FILE or - for stdin)."""
    manifest = storage_from(ctx).import_timeline(file.read())
    click.echo(
        json.dumps(
            {"tenant_id": manifest.tenant_id, "timeline_id": manifest.timeline_id, "layers": len(manifest.layers)}
        )
    )


@timeline.command("export")
@click.argument("tenant")
@click.argument("timeline_id", metavar="TIMELINE")
@click.pass_context
@one_line_errors
def timeline_export(ctx: click.Context, tenant: str, timeline_id: str) -> None:
    """Write the timeline's current manifest as compactor.timeline/v1 JSON to stdout."""
    click.echo(json.dumps(storage_from(ctx).export_timeline(tenant, timeline_id)))


@timeline.command("read")
@click.argument("tenant")
@click.argument("timeline_id", metavar="TIMELINE")
@click.option("--lsn", type=LSN, required=True)
@click.option("--key", type=KEY, default=None, help="read only this key")
@click.pass_context
@one_line_errors
def timeline_read(ctx: click.Context, tenant: str, timeline_id: str, lsn: int, key: bytes | None) -> None:
    """Print {"<key hex>": "<base64 value>"} for every key that exists at LSN."""
    import base64

    storage = storage_from(ctx)
    manifest = storage.manifest(tenant, timeline_id)
    gc = manifest.gc
    if lsn < gc.cutoff and lsn not in gc.retained_below(gc.cutoff):
        # Nothing promises reads there: gc-compaction keeps only the retain LSNs and leases
        # below the horizon, so the answer may already differ from what was once written.
        click.echo(
            f"warning: LSN {lsn:#x} is below the gc horizon {gc.cutoff:#x} and is neither a retain LSN nor a "
            "lease; history below the horizon may be gone",
            err=True,
        )
    key_range = FULL_KEY_RANGE if key is None else KeyRange(key, key_next(key))
    out = {format_key(k): base64.b64encode(v).decode() for k, v in storage.read(manifest, lsn, key_range)}
    click.echo(json.dumps(out))


@timeline.command("layers")
@click.argument("tenant")
@click.argument("timeline_id", metavar="TIMELINE")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
@one_line_errors
def timeline_layers(ctx: click.Context, tenant: str, timeline_id: str, as_json: bool) -> None:
    """List the timeline's layers."""
    rows = layer_listing(storage_from(ctx).manifest(tenant, timeline_id))
    if as_json:
        click.echo(json.dumps(rows))
        return
    for row in rows:
        click.echo(f"{row['kind']:5} {row['name']}  {row['file_size']} bytes")


@timeline.command("draw")
@click.argument("tenant")
@click.argument("timeline_id", metavar="TIMELINE")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="SVG file (default stdout)")
@click.option("--title", default="", help="picture title")
@click.pass_context
@one_line_errors
def timeline_draw(ctx: click.Context, tenant: str, timeline_id: str, out: Path | None, title: str) -> None:
    """Draw the layer map (key x LSN rectangles, horizon and retain LSNs marked) as SVG."""
    from compactor.coordinator.cli.draw import layer_map_svg

    svg = layer_map_svg(storage_from(ctx).manifest(tenant, timeline_id), title)
    if out is None:
        click.echo(svg, nl=False)
    else:
        out.write_text(svg)


@timeline.command("set-gc")
@click.argument("tenant")
@click.argument("timeline_id", metavar="TIMELINE")
@click.option("--cutoff", type=LSN, required=True)
@click.option("--retain-lsns", default=None, help="comma-separated LSNs (branch points)")
@click.option("--leases", default=None, help="comma-separated LSNs")
@click.pass_context
@one_line_errors
def timeline_set_gc(
    ctx: click.Context, tenant: str, timeline_id: str, cutoff: int, retain_lsns: str | None, leases: str | None
) -> None:
    """Update the gc info (cutoff, retain LSNs, leases) in a new manifest."""
    manifest = storage_from(ctx).set_gc(tenant, timeline_id, cutoff, lsn_list(retain_lsns), lsn_list(leases))
    click.echo(json.dumps({"manifest": manifest.number, "gc": manifest.gc.model_dump()}))


# Job commands (compact, jobs, job, worker, coordinator) live in their own module.
from compactor.coordinator.cli.jobs import register as _register_job_commands  # noqa: E402

_register_job_commands(main)


if __name__ == "__main__":
    main(prog_name="compactor")
