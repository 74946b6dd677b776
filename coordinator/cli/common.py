"""What every ``compactor`` command shares: one-line errors, parameter types (LSNs, keys,
sizes) and loading settings from the environment or ``--env-file``."""

import functools
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from compactor.storage.errors import CompactorError, InvalidInput, one_line, validation_summary
from compactor.storage.keys import parse_key
from compactor.storage.lsn import parse_lsn
from compactor.storage.settings import Settings
from compactor.storage.timeline import Storage

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
        except BrokenPipeError:
            # The reader went away (`compactor jobs | head -1`): that is its choice, not a failure.
            # Python would report the unflushed rest of stdout again at exit; send it nowhere.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        except (CompactorError, OSError) as err:
            fail(one_line(err))
        except ValidationError as err:
            fail(f"invalid configuration or input: {validation_summary(err)}")

    return wrapper  # type: ignore[return-value]


class _UsageLine(click.ClickException):
    exit_code = 2  # click's status for usage errors, kept

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


class OneLineUsageGroup(click.Group):
    """The root command group: click's usage errors (three lines: usage, hint, error) become the
    one ``error: ...`` line every other failure is, with the help to look at."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as err:
            raise _one_line_usage(err) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as err:
            raise _one_line_usage(err) from None


def _one_line_usage(err: click.UsageError) -> click.ClickException:
    if isinstance(err, click.exceptions.NoArgsIsHelpError):
        return err  # a bare group prints its help, as asked
    where = f" (see '{err.ctx.command_path} --help')" if err.ctx is not None else ""
    return _UsageLine(" ".join(err.format_message().split()) + where)


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


_SIZE_RE = re.compile(r"^\s*(\d+)\s*(KiB|MiB|GiB)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_size(text: str) -> int:
    """``4GiB``, ``512MiB``, ``64KiB`` or a plain number of bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise InvalidInput(f"invalid size {text!r}: expected a number of bytes or a KiB/MiB/GiB suffix, e.g. 4GiB")
    value = int(m.group(1)) * _UNITS[m.group(2).lower() if m.group(2) else None]
    if value < 1:
        raise InvalidInput(f"invalid size {text!r}: must be at least 1 byte")
    return value


class SizeType(click.ParamType):  # type: ignore[type-arg]
    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except InvalidInput as err:
            self.fail(str(err), param, ctx)


SIZE = SizeType()


def settings_from(ctx: click.Context) -> Settings:
    env_file = ctx.obj.get("env_file") if ctx.obj else None
    if env_file is not None and not env_file.is_file():
        raise CompactorError(f"env file {env_file} does not exist")
    settings = Settings(_env_file=env_file) if env_file else Settings()  # type: ignore[call-arg]
    logging.getLogger().setLevel(settings.log_level.upper())  # also honours --env-file
    return settings


def storage_from(ctx: click.Context) -> Storage:
    return Storage(settings_from(ctx))
