"""Redis clients of every process: one retry policy, URLs in the forms redis-py, kombu and
Celery's result backend each take, and a connectivity check that fails in one line."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from compactor.storage.errors import CompactorError, InvalidInput
from compactor.storage.settings import Settings


class RedisUnavailable(CompactorError):
    """Redis could not be reached."""


# ----------------------------------------------------------------------------- connections


def redact_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    return re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", url)


def redis_py_url(url: str) -> str:
    """The URL in the form redis-py takes: ``redis+socket:///path`` becomes ``unix:///path``."""
    if url.startswith("redis+socket://"):
        return "unix://" + url[len("redis+socket://") :]
    return url


def celery_redis_url(url: str) -> str:
    """The URL in the form kombu (broker) and Celery's redis result backend both take:
    ``unix:///path?db=N`` becomes ``redis+socket:///path?virtual_host=N``."""
    if url.startswith("unix://"):
        parts = urlsplit(url)
        db = parse_qs(parts.query).get("db", ["0"])[0]
        # Keep the credentials (``unix://:password@/path``): found by the security tests, the
        # broker and result backend connected without them while job records used them, so a
        # password-protected Redis on a socket refused every worker (kombu and Celery's
        # backend both read ``redis+socket://:password@/path``).
        userinfo = parts.netloc.rpartition("@")[0]
        return f"redis+socket://{userinfo + '@' if userinfo else ''}{parts.path}?virtual_host={db}"
    return url


def connect(settings: Settings, *, timeout_s: float | None = None, retries: bool = True) -> redis.Redis:
    """A redis-py client for ``settings.redis_url`` (bytes responses).

    One retry policy per call site: redis-py's own retry of a failed command (a few attempts
    with jittered backoff) is the only one on the record paths; the connectivity check turns
    it off so an unreachable Redis fails within ``timeout_s``.
    """
    timeout = timeout_s if timeout_s is not None else settings.redis_timeout_s
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": 30,
    }
    if not retries:
        kwargs["retry"] = Retry(NoBackoff(), 0)
    try:
        return redis.Redis.from_url(redis_py_url(settings.redis_url), **kwargs)
    except ValueError as err:
        raise InvalidInput(f"invalid COMPACTOR_REDIS_URL {redact_url(settings.redis_url)!r}: {err}") from None


def check_connectivity(settings: Settings, timeout_s: float = 2.0) -> None:
    """Raise RedisUnavailable with a one-line message unless Redis answers a PING in time."""
    client = connect(settings, timeout_s=timeout_s, retries=False)
    try:
        client.ping()
    except (redis.RedisError, OSError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise RedisUnavailable(f"cannot reach Redis at {redact_url(settings.redis_url)}: {reason}") from None
    finally:
        client.close()
