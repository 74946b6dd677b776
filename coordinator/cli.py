"""The ``compactor`` command line (CONTRACTS §4).

Machine-readable output goes to stdout; logs and progress to stderr. Every failure ends with a
one-line ``error: ...`` on stderr and a non-zero exit code.
"""

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from coordinator import logs
from storage.errors import CompactorError
from storage.keys import FULL_KEY_RANGE, KeyRange, format_key, key_next, parse_key
from storage.lsn import parse_lsn
from storage.settings import Settings
from storage.timeline import Storage, layer_listing

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def one_line_errors(func: F) -> F:
    """Turn every expected failure into ``error: <one line>`` and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CompactorError as err:
            fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
        except ValidationError as err:
            first = err.errors()[0]
            fail(f"invalid configuration or input: {'.'.join(map(str, first['loc']))}: {first['msg']}")
        except OSError as err:
            fail(f"{type(err).__name__}: {err}")

    return wrapper  # type: ignore[return-value]


class LsnType(click.ParamType):  # type: ignore[type-arg]
    name = "lsn"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_lsn(str(value))
        except CompactorError as err:
            self.fail(str(err), param, ctx)


class KeyType(click.ParamType):  # type: ignore[type-arg]
    name = "key"

    def convert(self, value: Any, param: Any, ctx: Any) -> bytes:
        if isinstance(value, bytes):
            return value
        try:
            return parse_key(str(value))
        except CompactorError as err:
            self.fail(str(err), param, ctx)


LSN = LsnType()
KEY = KeyType()


def lsn_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    return [parse_lsn(part) for part in text.split(",") if part.strip()]


@click.group()
@click.option(
    "--env-file", type=click.Path(dir_okay=False, path_type=Path), help="read COMPACTOR_ settings from this file"
)
@click.pass_context
def main(ctx: click.Context, env_file: Path | None) -> None:
    """gc-compaction of layered page storage, as distributed jobs."""
    logs.configure()
    ctx.ensure_object(dict)
    ctx.obj["env_file"] = env_file


def settings_from(ctx: click.Context) -> Settings:
    env_file = ctx.obj.get("env_file") if ctx.obj else None
    if env_file is not None and not env_file.is_file():
        raise CompactorError(f"env file {env_file} does not exist")
    return Settings(_env_file=env_file) if env_file else Settings()  # type: ignore[call-arg]


def storage_from(ctx: click.Context) -> Storage:
    return Storage(settings_from(ctx))


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


if __name__ == "__main__":
    main()
