"""A real S3 endpoint on loopback: a moto server in a child process.

Used by the test fixtures and by ``compactor up``; it imports nothing from pytest.

    with S3Server() as server:          # or server.start() / server.stop()
        settings = Settings(s3_endpoint_url=server.endpoint_url, ...)

The child binds port 0 itself and reports the port it got, so there is no race for a "free"
port. It exits when its stdin closes, so it never outlives the process that started it.

Run directly (``python -m compactor.coordinator.local.s3server --port 9000``) it serves until interrupted.

moto checks ``If-None-Match``/``If-Match`` and then writes as two steps, so two concurrent
create-only PUTs can both succeed on its threaded server; real S3 and MinIO decide atomically.
The server here runs the requests on one object one at a time, which restores that atomicity
(the manifest commit protocol depends on it), and requests on different objects at once, as a
real store does (``_PerObject``).

moto also builds the body of a ranged GET by reading the whole object and slicing it: a 64 KiB
footer read of a 128 MiB layer costs the server about 70 ms of CPU, as much as reading all of it,
where S3 and MinIO read the range alone. Workers read layers by slices and footers, so with a few
nodes that cost, not the workers, bounded the scale-out benchmark. A plain ranged GET (one
``bytes=A-B`` range of an existing object, no query, no conditions) is therefore answered here
from that range of moto's stored bytes; anything else goes to moto unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import re
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

READY_PREFIX = "S3SERVER READY "

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

_RANGE = re.compile(r"bytes=(\d+)-(\d+)")
# Object keys the fast path serves: those of this project's bucket layout (no escaping to undo).
_PLAIN_PATH = re.compile(r"/([a-z0-9][a-z0-9.-]+)/([A-Za-z0-9/_.=-]+)")
# As moto finds it in the Authorization header (moto.core.responses.BaseResponse).
_ACCESS_KEY = re.compile(r"AWS.*(?P<access_key>(?<![A-Z0-9])[A-Z0-9]{20}(?![A-Z0-9]))[:/]")
_REGION = re.compile(r"Credential=[^/]+/\d{8}/(?P<region>[a-z0-9-]+)/")


class _RangedGets:
    """Answers a plain ranged GET of an object from the stored bytes of that range alone, and
    passes every other request to moto (module docstring). Must run under its object's lock
    (``_PerObject``): an overwrite or a delete closes the replaced object's buffer."""

    def __init__(self, app: WsgiApp) -> None:
        self._app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        answer = self._ranged(environ)
        if answer is None:
            return self._app(environ, start_response)
        headers, body = answer
        start_response("206 Partial Content", list(headers.items()))
        return [body]

    @staticmethod
    def _ranged(environ: dict[str, Any]) -> tuple[dict[str, str], bytes] | None:
        from moto.iam.models import get_account_id_from
        from moto.s3.models import FakeKey, s3_backends
        from moto.utilities.utils import get_partition

        wanted = _RANGE.fullmatch(environ.get("HTTP_RANGE", ""))
        path = _PLAIN_PATH.fullmatch(environ.get("PATH_INFO", ""))
        host = environ.get("HTTP_HOST", "").rsplit(":", 1)[0].strip("[]")
        if (
            environ["REQUEST_METHOD"] != "GET"
            or environ.get("QUERY_STRING", "") not in ("", "x-id=GetObject")  # newer SDKs name the call
            or wanted is None
            or path is None
            or not _is_address(host)  # a name may carry the bucket (virtual-hosted style)
            or any(k.startswith(("HTTP_IF_", "HTTP_X_AMZ_SERVER_SIDE", "HTTP_X_MOTO")) for k in environ)
            or "MOTO_ACCOUNT_ID" in os.environ
        ):
            return None
        # The account and partition moto would pick (unsigned: its default access key and region).
        authorization = environ.get("HTTP_AUTHORIZATION", "")
        access_key, region = _ACCESS_KEY.search(authorization), _REGION.search(authorization)
        account = get_account_id_from(access_key["access_key"] if access_key else "AKIAEXAMPLE")
        backend = s3_backends[account][get_partition(region["region"] if region else "")]
        bucket = backend.buckets.get(path[1])
        key = bucket.keys.get(path[2]) if bucket is not None else None
        # moto's stored bytes (FakeKey.value would read them all); another moto version may keep
        # them elsewhere, and then moto answers.
        stored = getattr(key, "_value_buffer", None)
        first, last = int(wanted[1]), int(wanted[2])
        if not isinstance(key, FakeKey) or stored is None or key.encryption is not None:
            return None  # moto answers: missing, a delete marker, encrypted
        if first > last or first >= key.size:
            return None  # moto answers: unsatisfiable
        last = min(last, key.size - 1)
        with key.lock:
            stored.seek(first)
            body = stored.read(last - first + 1)
        headers = {
            **key.response_dict,
            **key.metadata,
            "Accept-Ranges": "bytes",
            "content-length": str(len(body)),
            "content-range": f"bytes {first}-{last}/{key.size}",
        }
        return headers, body


def _is_address(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _PerObject:
    """Runs a WSGI app's handler (and the build of its response body) under a lock per object:
    requests on one object run one at a time, requests on different objects at once (as S3
    serves them), and a request on a bucket or the service runs alone.

    One lock for every request made the server one request at a time: a part upload waited
    while another layer's multipart upload completed (moto copies every part then), and the
    uploader of one layer stalled the merge behind it. A request that reads another object too
    (``x-amz-copy-source``) runs alone, as does one on an object of a virtual-hosted bucket
    whose name this cannot tell from its path.
    """

    def __init__(self, app: WsgiApp) -> None:
        self._app = app
        self._state = threading.Condition()
        self._objects_busy = 0  # requests on objects now running
        self._alone = False  # a request that runs alone is running
        self._alone_waiting = 0  # ... or waiting: object requests wait behind it
        self._locks: dict[str, list[Any]] = {}  # object -> [its lock, requests holding or waiting]

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        name = _object_of(environ)
        if name is None:
            with self._running_alone():
                return self._handle(environ, start_response)
        with self._state:
            while self._alone or self._alone_waiting:
                self._state.wait()
            self._objects_busy += 1
            entry = self._locks.setdefault(name, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                return self._handle(environ, start_response)
        finally:
            with self._state:
                self._objects_busy -= 1
                entry[1] -= 1
                if not entry[1]:
                    del self._locks[name]
                self._state.notify_all()

    @contextlib.contextmanager
    def _running_alone(self) -> Iterator[None]:
        with self._state:
            self._alone_waiting += 1
            while self._alone or self._objects_busy:
                self._state.wait()
            self._alone_waiting -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._state:
                self._alone = False
                self._state.notify_all()

    def _handle(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        result = self._app(environ, start_response)
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        return [body]


def _object_of(environ: dict[str, Any]) -> str | None:
    """The bucket and key a path-style request is on; None for one on a bucket or the service,
    and for one that must run alone."""
    host = environ.get("HTTP_HOST", "").rsplit(":", 1)[0].strip("[]")
    if not _is_address(host) or "HTTP_X_AMZ_COPY_SOURCE" in environ:
        return None
    bucket, _, key = environ.get("PATH_INFO", "").lstrip("/").partition("/")
    return f"{bucket}/{key}" if bucket and key else None


def serve(host: str = "127.0.0.1", port: int = 0, *, exit_on_stdin_eof: bool = False, verbose: bool = False) -> None:
    """Serve moto's S3 on ``host:port`` in this process until interrupted; prints
    ``READY_PREFIX + endpoint URL`` on stdout once accepting connections."""
    import logging

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    if not verbose:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app = _PerObject(_RangedGets(DomainDispatcherApplication(create_backend_app)))
    server = make_server(host, port, app, threaded=True, request_handler=MotoRequestHandler)
    url_host = f"[{host}]" if ":" in host else host
    print(f"{READY_PREFIX}http://{url_host}:{server.server_port}", flush=True)
    # Nothing else may block on the parent's pipe, which it stops reading after the ready line.
    os.dup2(2, 1)

    if exit_on_stdin_eof:

        def watch_stdin() -> None:
            try:
                while sys.stdin.buffer.read(4096):
                    pass
            finally:
                server.shutdown()

        threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


class S3Server:
    """A moto S3 server in a child process, on a loopback port chosen by the OS."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        log_file: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = 60.0,
        verbose: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.log_file = Path(log_file) if log_file is not None else None
        self.startup_timeout_s = startup_timeout_s
        self.verbose = verbose
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._endpoint_url: str | None = None

    @property
    def endpoint_url(self) -> str:
        if self._endpoint_url is None:
            raise RuntimeError("S3 server not started")
        return self._endpoint_url

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> str:
        """Start the server and return its endpoint URL once it accepts connections."""
        if self._proc is not None:
            raise RuntimeError("S3 server already started")
        args = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--exit-on-stdin-eof",
        ]
        if self.verbose:
            args.append("--verbose")
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_file, "ab")  # noqa: SIM115 - lives as long as the child
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log if self._log is not None else None,
            # The child must not take the parent's Ctrl-C: the parent stops it in order.
            start_new_session=True,
        )
        try:
            self._endpoint_url = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self._endpoint_url

    def _wait_ready(self) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout_s
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self._proc.stdout, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(f"S3 server did not start within {self.startup_timeout_s:.0f}s")
                if selector.select(timeout=min(remaining, 0.5)):
                    chunk = os.read(self._proc.stdout.fileno(), 4096)
                    if not chunk:
                        code = self._proc.wait()
                        raise RuntimeError(f"S3 server exited during startup with code {code}")
                    buffer += chunk
                    for line in buffer.decode(errors="replace").splitlines():
                        if line.startswith(READY_PREFIX):
                            return line[len(READY_PREFIX) :].strip()
                elif self._proc.poll() is not None:
                    raise RuntimeError(f"S3 server exited during startup with code {self._proc.returncode}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the child: close its stdin, then SIGTERM, then SIGKILL."""
        proc, self._proc = self._proc, None
        self._endpoint_url = None
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            try:
                proc.wait(timeout=timeout_s / 2)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout_s / 2)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a moto S3 endpoint (conditional writes made atomic).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on stdout)")
    parser.add_argument("--exit-on-stdin-eof", action="store_true", help="stop when stdin closes")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    serve(args.host, args.port, exit_on_stdin_eof=args.exit_on_stdin_eof, verbose=args.verbose)


if __name__ == "__main__":
    main()
