"""Process lifecycle: listeners before anything else, pidfile, detaching, stop/status.

The order is fixed so that every start-up error reaches the operator's terminal:
resolve paths -> lock the pidfile -> bind (or inherit from systemd) -> with
``--daemon``: double fork -> write the pidfile -> only then the event loop.
The foreground parent of a daemon waits on a pipe for one line from it
(``ready ADDRESS`` or ``error MESSAGE``), prints the outcome and exits.
Nothing here forks a process that is running an event loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, NoReturn

from aecho.address import format_address
from aecho.config import ConfigError, ServerConfig
from aecho.handlers import HandlerError
from aecho.loops import loop_factory
from aecho.process.systemd import LISTEN_FIELD, ActivationError, listen_sockets, notify
from aecho.server import StartupError, bind_listeners

if TYPE_CHECKING:
    from aecho.server import Server

log = logging.getLogger("aecho.daemon")

READY_TIMEOUT_ENV = "AECHO_READY_TIMEOUT"
DEFAULT_READY_TIMEOUT = 30.0
DEFAULT_STOP_TIMEOUT = 15.0
# A status or stop probe holds the pidfile lock for microseconds; a starting
# server retries this long before it concludes that another server holds it.
LOCK_RETRY_S = 0.5
POLL_S = 0.02


class PidfileError(StartupError):
    """The pidfile is held by a running server or cannot be used."""


# -- pidfile ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PidfileInfo:
    pid: int | None
    address: str = ""
    started: float | None = None


def default_pidfile(config: ServerConfig) -> str:
    """``$XDG_RUNTIME_DIR/aecho-PORT.pid``, else ``/tmp/aecho-PORT.pid``."""
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if not (os.path.isabs(base) and os.path.isdir(base)):
        base = "/tmp"
    name = f"unix-{os.path.basename(config.unix)}" if config.unix else str(config.port)
    return os.path.join(base, f"aecho-{name}.pid")


def parse_pidfile(text: str) -> PidfileInfo:
    """First line the pid (what every pidfile reader expects), then ``key=value`` lines."""
    lines = text.splitlines()
    pid: int | None = None
    if lines and lines[0].strip().isdigit():
        pid = int(lines[0].strip())
    fields = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
    started: float | None = None
    with contextlib.suppress(ValueError):
        started = float(fields.get("started", ""))
    return PidfileInfo(pid, fields.get("address", ""), started)


def _same_file(path: str, fd: int) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _read_fd(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


class Pidfile:
    """A pidfile whose ``flock`` is held for the server's life.

    The lock, not the pid inside, says whether a server is running: a pid can be
    reused, a lock dies with its process.  Rewrites go to a locked temporary file
    that is renamed over the path, so readers see the old content or the new,
    never half, and the path always names a locked file.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def acquire(cls, path: str) -> Pidfile:
        """Lock ``path`` (creating it empty if missing); a stale pidfile is taken over.

        Raises:
            PidfileError: another live server holds it, or it cannot be opened.
        """
        deadline = time.monotonic() + LOCK_RETRY_S
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise PidfileError(f"cannot open pidfile {path}: {exc.strerror}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(POLL_S)
                    continue
                raise PidfileError(_already_running(path)) from None
            except OSError as exc:
                os.close(fd)
                raise PidfileError(f"cannot lock pidfile {path}: {exc.strerror}") from exc
            # Between open and flock the holder may have renamed a new file over the
            # path or removed it; the lock we got is then on a file nobody looks at.
            if _same_file(path, fd):
                return cls(path, fd)
            os.close(fd)
            if time.monotonic() >= deadline:
                raise PidfileError(f"pidfile {path} keeps changing: is another server starting?")

    def write(self, pid: int, address: str, started: float) -> None:
        """Replace the content atomically, keeping the path locked throughout.

        Raises:
            PidfileError: the temporary file cannot be written or renamed.
        """
        content = f"{pid}\naddress={address}\nstarted={started:.3f}\n".encode()
        tmp = f"{self.path}.{pid}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise PidfileError(f"cannot write pidfile {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, content)
            os.rename(tmp, self.path)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise PidfileError(f"cannot write pidfile {self.path}: {exc.strerror}") from exc
        os.close(self.fd)
        self.fd = fd

    def remove(self) -> None:
        """Unlink the path (if it is still ours), then release the lock."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            if _same_file(self.path, self.fd):
                os.unlink(self.path)
        self.forget()

    def forget(self) -> None:
        """Close this process's descriptor without touching the file."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _already_running(path: str) -> str:
    with contextlib.suppress(OSError):
        info = read_pidfile(path)
        if info is not None and info.pid is not None:
            where = f" on {info.address}" if info.address else ""
            return (
                f"already running (pid {info.pid}{where}, pidfile {path}): "
                f"stop it with 'aecho stop --pidfile {path}' or use another --pidfile"
            )
    return f"pidfile {path} is held by another aecho server: use another --pidfile"


def read_pidfile(path: str) -> PidfileInfo | None:
    """The content of ``path``, or None when there is no such file.

    Raises:
        OSError: the file exists but cannot be read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return parse_pidfile(_read_fd(fd))
    finally:
        os.close(fd)


def probe(path: str) -> tuple[str, PidfileInfo | None]:
    """``("absent" | "stale" | "starting" | "running", info)`` for the pidfile at ``path``.

    Raises:
        OSError: the pidfile exists but cannot be read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return "absent", None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            locked = True
        else:
            locked = False
            fcntl.flock(fd, fcntl.LOCK_UN)
        info = parse_pidfile(_read_fd(fd))
    finally:
        os.close(fd)
    if not locked:
        return "stale", info
    if info.pid is None:
        return "starting", info
    return ("running" if pid_alive(info.pid) else "stale"), info


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie waiting for its parent."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def remove_if_stale(path: str) -> None:
    """Remove the pidfile at ``path`` if no process holds its lock."""
    try:
        pidfile = Pidfile.acquire(path)
    except PidfileError:
        return
    pidfile.remove()


# -- process plumbing ------------------------------------------------------------------------

# Descriptors that children forked after start-up (offload workers) must not keep:
# a worker holding the pidfile lock would make a killed server look alive.
_close_in_children: set[int] = set()
_atfork_registered = False


def _close_after_fork() -> None:
    for fd in list(_close_in_children):
        with contextlib.suppress(OSError):
            os.close(fd)
    _close_in_children.clear()


def _keep_from_children(*fds: int) -> None:
    global _atfork_registered
    if not _atfork_registered:
        os.register_at_fork(after_in_child=_close_after_fork)
        _atfork_registered = True
    _close_in_children.update(fd for fd in fds if fd >= 0)


def _send(fd: int, line: str) -> None:
    data = (" ".join(line.split("\n")) + "\n").encode("utf-8", errors="replace")
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(fd, data) :]


def _open_log(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _redirect_stdio(log_file: str | None) -> None:
    """stdin from /dev/null; stdout and stderr to the log file or /dev/null."""
    null = os.open(os.devnull, os.O_RDWR)
    out = _open_log(log_file) if log_file else null
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in {null, out}:
        if fd > 2:
            os.close(fd)


def _log_file_fds() -> set[int]:
    fds = set()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler.stream is not None:
            with contextlib.suppress(OSError, ValueError):
                fds.add(handler.stream.fileno())
    return fds


def _close_inherited_fds(keep: set[int]) -> None:
    """Close every descriptor above 2 that is not in ``keep``."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        import resource

        fds = list(range(3, min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 65536)))
    for fd in fds:
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def reopen_log_files(redirect_stdio: bool = False) -> None:
    """Reopen the log file by name (after rotation by rename), on SIGHUP.

    With ``redirect_stdio`` (a daemon), stdout and stderr follow the log file too.
    Failures are logged; the old file stays in use.
    """
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler):
            continue
        try:
            # Append, whatever the original mode: the point is to follow a rename.
            stream = open(handler.baseFilename, "a", encoding=handler.encoding)  # noqa: SIM115
        except OSError as exc:
            log.error("cannot reopen log file %s: %s", handler.baseFilename, exc.strerror)
            continue
        old = handler.setStream(stream)
        if old is not None:
            old.close()
        if redirect_stdio:
            fd = stream.fileno()
            os.dup2(fd, 1)
            os.dup2(fd, 2)


def set_process_title(title: str) -> None:
    """Show ``title`` in ps/top (no-op without setproctitle)."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(title)


def open_listeners(config: ServerConfig) -> list[socket.socket]:
    """Sockets passed by systemd socket activation, else freshly bound ones.

    Raises:
        StartupError: binding failed, or the inherited descriptors are unusable.
    """
    try:
        inherited = listen_sockets()
    except ActivationError as exc:
        raise StartupError(str(exc)) from exc
    if inherited:
        return inherited
    return bind_listeners(config)


def _absolute_paths(config: ServerConfig) -> ServerConfig:
    """Paths made absolute (a daemon changes to /), and the default pidfile filled in."""
    pidfile = config.pidfile or (default_pidfile(config) if config.daemon else None)

    def absolute(path: str | None) -> str | None:
        return os.path.abspath(path) if path else None

    return dataclasses.replace(
        config,
        pidfile=absolute(pidfile),
        log_file=absolute(config.log_file),
        unix=absolute(config.unix),
    )


def _describe(exc: BaseException, config: ServerConfig) -> str:
    if isinstance(exc, StartupError | HandlerError | ConfigError):
        return str(exc)
    hint = (
        f" (details in {config.log_file})" if config.log_file else " (use --log-file for details)"
    )
    return f"the server failed while starting: {type(exc).__name__}: {exc}{hint}"


# -- lifecycle -------------------------------------------------------------------------------


class Lifecycle:
    """Everything around one server process: listeners, pidfile, readiness, detaching.

    ``Lifecycle.begin(config)`` returns in the process that will serve; used as a
    context manager around the event loop, it reports failure to a waiting parent
    and removes the pidfile on the way out.
    """

    def __init__(
        self, config: ServerConfig, sockets: list[socket.socket], pidfile: Pidfile | None
    ) -> None:
        self.config = config
        self.sockets = sockets
        self._pidfile = pidfile
        self._pipe = -1
        self._ready = False

    @property
    def address(self) -> str:
        return " ".join(format_address(sock.getsockname()) for sock in self.sockets)

    @classmethod
    def begin(cls, config: ServerConfig) -> Lifecycle:
        """Lock the pidfile, bind, detach (with ``--daemon``) and write the pidfile.

        With ``--daemon`` the calling process does not return: it waits for the
        daemon, prints the outcome and exits 0, or raises.

        Raises:
            StartupError: the pidfile is held, binding failed, the daemon failed
                before it was ready, or readiness timed out.
            ConfigError: the requested event loop is not available.
        """
        config = _absolute_paths(config)
        loop_factory(config.loop)  # an unavailable --loop is reported here, not by the daemon
        pidfile = Pidfile.acquire(config.pidfile) if config.pidfile else None
        try:
            sockets = open_listeners(config)
        except BaseException:
            if pidfile is not None:
                pidfile.remove()
            raise
        life = cls(config, sockets, pidfile)
        try:
            if config.daemon:
                life._detach()
            if pidfile is not None:
                pidfile.write(os.getpid(), life.address, time.time())
                _keep_from_children(pidfile.fd)
            set_process_title(f"aecho: server {life.address}")
        except BaseException as exc:
            life.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return life

    def _detach(self) -> None:
        """Double fork; only the daemon returns.  The caller waits and exits."""
        ready_r, ready_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            raise StartupError(f"cannot start the daemon: {exc.strerror}") from exc
        if pid > 0:
            os.close(ready_w)
            if self._pidfile is not None:
                self._pidfile.forget()  # the daemon holds the lock now
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)  # the first child exits at once: reap it
            self._await_readiness(ready_r)
        try:
            os.close(ready_r)
            os.setsid()  # a new session: no controlling terminal, no terminal signals
            if os.fork() > 0:
                os._exit(0)  # the grandchild is not a session leader: it can never get a tty
        except OSError as exc:
            _send(ready_w, f"error cannot detach: {exc.strerror}")
            os._exit(1)
        self._pipe = ready_w
        _send(ready_w, f"pid {os.getpid()}")
        try:
            os.chdir("/")
            os.umask(0o022)
            _redirect_stdio(self.config.log_file)
            keep = {ready_w, *(s.fileno() for s in self.sockets), *_log_file_fds()}
            if self._pidfile is not None:
                keep.add(self._pidfile.fd)
            _close_inherited_fds(keep)
        except OSError as exc:
            _send(ready_w, f"error cannot detach: {exc.strerror}")
            os._exit(1)
        _keep_from_children(ready_w)

    def _await_readiness(self, fd: int) -> NoReturn:
        """In the foreground parent: relay the daemon's outcome, then exit.

        Raises:
            StartupError: the daemon failed, vanished, or was not ready in time.
        """
        try:
            timeout = float(os.environ.get(READY_TIMEOUT_ENV, DEFAULT_READY_TIMEOUT))
        except ValueError:
            timeout = DEFAULT_READY_TIMEOUT
        deadline = time.monotonic() + timeout
        daemon_pid: int | None = None
        buffer = b""
        while (remaining := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                raw, buffer = buffer.split(b"\n", 1)
                kind, _, rest = raw.decode("utf-8", errors="replace").partition(" ")
                if kind == "pid" and rest.isdigit():
                    daemon_pid = int(rest)
                elif kind == "ready":
                    print(f"aecho serving on {rest} (pid {daemon_pid})", flush=True)
                    raise SystemExit(0)
                elif kind == "error":
                    raise StartupError(rest)
        else:
            if daemon_pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(daemon_pid, signal.SIGKILL)
                _wait_gone(daemon_pid, 5.0)
            if self.config.pidfile:
                remove_if_stale(self.config.pidfile)
            raise StartupError(
                f"the daemon (pid {daemon_pid}) was not ready within {timeout:g}s and was "
                f"stopped; set {READY_TIMEOUT_ENV} to wait longer"
                + (f", see {self.config.log_file}" if self.config.log_file else "")
            )
        raise StartupError(
            "the daemon exited before it was ready"
            + (f": see {self.config.log_file}" if self.config.log_file else "")
        )

    def on_ready(self, server: Server) -> None:
        """Tell whoever waits (the foreground parent, systemd) that we serve."""
        self._ready = True
        address = ", ".join(format_address(a) for a in server.addresses)
        if self._pipe >= 0:
            _send(self._pipe, f"ready {address}")
            os.close(self._pipe)
            _close_in_children.discard(self._pipe)
            self._pipe = -1
        listen = " ".join(format_address(a) for a in server.addresses)
        notify(f"READY=1\nSTATUS=serving on {address}\n{LISTEN_FIELD}={listen}")

    def __enter__(self) -> Lifecycle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and not self._ready and self._pipe >= 0:
            log.debug("start-up failed", exc_info=exc)
            _send(self._pipe, f"error {_describe(exc, self.config)}")
        if self._pipe >= 0:
            with contextlib.suppress(OSError):
                os.close(self._pipe)
            self._pipe = -1
        if self._pidfile is not None:
            self._pidfile.remove()
            self._pidfile = None


# -- stop and status -------------------------------------------------------------------------


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True


def _not_running(path: str, state: str, info: PidfileInfo | None) -> str:
    if state == "absent":
        return f"not running (no pidfile at {path})"
    pid = f"pid {info.pid} is gone" if info is not None and info.pid else "no pid in it"
    return f"not running (stale pidfile {path}: {pid})"


def stop_server(path: str, timeout: float = DEFAULT_STOP_TIMEOUT) -> int:
    """SIGTERM the server named by the pidfile and wait; SIGKILL past ``timeout``.

    Returns the exit status: 0 stopped, 1 nothing was running or it could not be signalled.
    """
    try:
        state, info = probe(path)
    except OSError as exc:
        print(f"aecho: error: cannot read pidfile {path}: {exc.strerror}", file=sys.stderr)
        return 1
    if state == "starting":
        print(f"aecho: error: the server for {path} is still starting; retry", file=sys.stderr)
        return 1
    if state != "running" or info is None or info.pid is None:
        print(f"aecho: {_not_running(path, state, info)}", file=sys.stderr)
        return 1
    pid = info.pid
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        print(f"aecho: stopped (pid {pid} had already exited)")
        return 0
    except PermissionError:
        print(f"aecho: error: not allowed to signal pid {pid}: run as its user", file=sys.stderr)
        return 1
    if _wait_gone(pid, timeout):
        print(f"aecho: stopped (pid {pid})")
        return 0
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    print(
        f"aecho: pid {pid} did not stop within {timeout:g}s after SIGTERM; killed it (SIGKILL)",
        file=sys.stderr,
    )
    _wait_gone(pid, 5.0)
    remove_if_stale(path)
    return 0


def _format_uptime(seconds: float) -> str:
    s = int(max(seconds, 0))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {s}s"
    if minutes:
        return f"{minutes}m {s}s"
    return f"{s}s"


def server_status(path: str) -> int:
    """Print whether the server named by the pidfile runs; 0 running, 3 not (LSB), 4 unknown."""
    try:
        state, info = probe(path)
    except OSError as exc:
        print(f"aecho: status unknown: cannot read pidfile {path}: {exc.strerror}")
        return 4
    if state == "starting":
        print(f"aecho: starting (pidfile {path} is locked, no pid written yet)")
        return 0
    if state != "running" or info is None:
        print(f"aecho: {_not_running(path, state, info)}")
        return 3
    parts = [f"running, pid {info.pid}"]
    if info.address:
        parts.append(f"serving on {info.address}")
    if info.started is not None:
        parts.append(f"up {_format_uptime(time.time() - info.started)}")
    print("aecho: " + ", ".join(parts))
    return 0
