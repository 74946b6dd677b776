"""Worker plugins: code loaded into every worker process that watches a job's attempts reach
named points, and may act there: count or trace them, hold an attempt, or fail it. dramatiq's
middleware and SlateDB's fail-point registry are the models: the runtime names its points and
calls them; what happens at a point is the plugin's business, so nothing here knows who listens
(the fault suite is one such plugin: ``tests/faultplugin.py``).

Plugins are listed in ``COMPACTOR_WORKER_PLUGINS`` as ``module:attribute`` (comma-separated),
each attribute a factory called with the worker's Settings; they are loaded once per process.

The points (``POINTS``), in the order an attempt meets them:

``in_download``   a sub-job is about to fetch an input layer (on a download thread)
``in_merge``      a sub-job read an input layer's first record batch (the k-merge is under way)
``in_upload``     a sub-job uploaded an output layer
``before_commit`` a meta job's finalize is about to write its one manifest
``in_commit``     that manifest is written; the job record does not say so yet
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from compactor.storage.errors import CompactorError, InvalidInput
from compactor.storage.settings import Settings
from compactor.storage.timeline import Storage

log = logging.getLogger(__name__)

POINTS = ("in_download", "in_merge", "in_upload", "before_commit", "in_commit")

Hold = Callable[[float], None]
"""Holds the attempt up to that many seconds while it stays alive (its heartbeat goes on, its
progress says ``paused``); raises the attempt's stop reason at once if it must stop meanwhile."""


@dataclass(frozen=True)
class Attempt:
    """Who reached a point: an attempt of sub-job ``sub_id``, or the finalize of meta job
    ``meta_id`` (``sub_id`` None, ``number`` 0)."""

    meta_id: str
    sub_id: str | None
    number: int
    node: str
    pid: int

    @property
    def job_id(self) -> str:
        return self.sub_id or self.meta_id


class Plugin:
    """A worker plugin; every method does nothing here, so a plugin overrides what it needs."""

    def reached(self, point: str, attempt: Attempt, hold: Hold) -> None:
        """``attempt`` is at ``point``. Runs on the thread doing the work; a CompactorError
        raised here fails the attempt there like any other error of its work."""


class Plugins:
    """The plugins of one worker process, called in the order they were listed."""

    def __init__(self, plugins: list[Plugin] | None = None) -> None:
        self.plugins = list(plugins or [])

    def reached(self, point: str, attempt: Attempt, hold: Hold) -> None:
        for plugin in self.plugins:
            plugin.reached(point, attempt, hold)

    def checkpoint(self, attempt: Attempt, hold: Hold) -> Callable[[str], None] | None:
        """What tells the plugins that ``attempt`` reached a point; None without plugins, so
        that an attempt nobody watches pays nothing."""
        if not self.plugins:
            return None
        return lambda point: self.reached(point, attempt, hold)

    def watching(self, storage: Storage, attempt: Attempt, hold: Hold) -> Storage:
        """``storage`` as ``attempt`` sees it: its layer I/O reaches the plugins' points."""
        checkpoint = self.checkpoint(attempt, hold)
        return storage if checkpoint is None else storage.reporting(checkpoint)


def load(settings: Settings) -> Plugins:
    """The plugins ``settings.worker_plugins`` lists. A spec that does not name a factory, or a
    factory that fails, is an InvalidInput naming it: a worker must not start half-equipped."""
    loaded: list[Plugin] = []
    for spec in filter(None, (part.strip() for part in settings.worker_plugins.split(","))):
        module_name, _, attribute = spec.partition(":")
        try:
            factory: Any = getattr(importlib.import_module(module_name), attribute)
            plugin = factory(settings)
        except (ImportError, AttributeError, TypeError, ValueError, CompactorError) as err:
            raise InvalidInput(f"worker plugin {spec!r} did not load: {err}") from None
        if not isinstance(plugin, Plugin):
            raise InvalidInput(f"worker plugin {spec!r} is not a compactor Plugin: {type(plugin).__name__}")
        loaded.append(plugin)
        log.info("worker plugin loaded plugin=%s pid=%d", spec, os.getpid())
    return Plugins(loaded)
