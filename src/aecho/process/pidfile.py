"""The pidfile: the pid and a newline, locked by the serving process for its whole life.

The lock, not the pid inside, says whether a server is running: a pid can be
reused, a lock dies with its process.  It is a POSIX record lock (``fcntl``), not
``flock``, because a record lock reports its holder's pid: ``stop`` and ``status``
signal a pid only when it is the one written in the file, holds the lock, and is an
aecho server by its process title.  A record lock belongs to a process and is not
inherited, so a daemon takes it after detaching, and the serving process never
opens the path a second time (closing any descriptor of a file drops the process's
locks on it).

The path is opened with O_NOFOLLOW and content is written to a ``mkstemp`` file in
the same directory that is locked and then renamed over the path, so readers see
the old content or the new, never half, the path always names a locked file, and
a symlink planted at either name is never followed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import stat
import tempfile
import time
from dataclasses import dataclass

from aecho.server.listeners import StartupError
from aecho.text import printable

# A status or stop probe looks at the pidfile for microseconds; a starting server
# retries this long before it concludes that another server holds it.
LOCK_RETRY_S = 0.5
POLL_S = 0.02
# What a serving process's title starts with (see aecho.process.titles).
SERVER_TITLES = (b"aecho: server", b"aecho: supervisor")
# The kernel's ceiling for pid_max on 64-bit systems.
PID_MAX_LIMIT = 4194304


class PidfileError(StartupError):
    """The pidfile is held by a running server or cannot be used."""


class _Flock(ctypes.Structure):
    """``struct flock`` as the C library lays it out on this platform."""

    _fields_ = [
        ("l_type", ctypes.c_short),
        ("l_whence", ctypes.c_short),
        ("l_start", ctypes.c_int64),
        ("l_len", ctypes.c_int64),
        ("l_pid", ctypes.c_int),
    ]


def _lock(fd: int) -> bool:
    """Take a write lock on the whole file without waiting; False if someone holds it.

    Raises:
        OSError: the lock cannot be taken for another reason.
    """
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    return True


def lock_holder(fd: int) -> int | None:
    """The pid of the process holding a lock on the file, or None when it is unlocked.

    Raises:
        OSError: the query failed.
    """
    query = _Flock(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    answer = fcntl.fcntl(fd, fcntl.F_GETLK, bytes(query))
    result = _Flock.from_buffer_copy(answer)
    return None if result.l_type == fcntl.F_UNLCK else int(result.l_pid)


def _open(path: str, flags: int) -> int:
    """Open ``path`` without following a symlink, and only if it is a regular file.

    Raises:
        OSError: it cannot be opened, is a symlink (ELOOP), or is not a regular file.
    """
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link (refused: a pidfile is never followed through a link)"
    return exc.strerror or str(exc)


def _same_file(path: str, fd: int) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _refuse_a_live_server(path: str, fd: int) -> None:
    """Unlocked, yet naming a running aecho server (the file was replaced): taking it over
    would leave that server without a pidfile that stop and status can find.

    Raises:
        PidfileError: the pid in the file is a running aecho server other than this one.
    """
    pid = parse_pid(os.pread(fd, 64, 0).decode("ascii", "replace"))
    if pid is not None and pid != os.getpid() and is_live_server(pid):
        os.close(fd)
        raise PidfileError(
            f"pidfile {path} names pid {pid}, a running aecho server that does not hold it "
            "(was the file replaced?): stop that server or use another --pidfile"
        )


class Pidfile:
    """A pidfile this process holds locked; see the module docstring."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def acquire(cls, path: str) -> Pidfile:
        """Lock ``path`` (creating it empty if missing); a stale pidfile is taken over.

        Raises:
            PidfileError: another live server holds it, or it cannot be used.
        """
        deadline = time.monotonic() + LOCK_RETRY_S
        while True:
            try:
                fd = _open(path, os.O_RDWR | os.O_CREAT)
                locked = _lock(fd)
            except OSError as exc:
                raise PidfileError(f"cannot use pidfile {path}: {_reason(exc)}") from exc
            if not locked:
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(POLL_S)
                    continue
                raise PidfileError(already_running(path))
            # Between open and lock the holder may have renamed a new file over the
            # path or removed it; the lock we got is then on a file nobody looks at.
            if _same_file(path, fd):
                _refuse_a_live_server(path, fd)
                return cls(path, fd)
            os.close(fd)
            if time.monotonic() >= deadline:
                raise PidfileError(f"pidfile {path} keeps changing: is another server starting?")

    def write(self, pid: int) -> None:
        """Replace the content with ``pid``, atomically, keeping the path locked throughout.

        Raises:
            PidfileError: the temporary file cannot be made, written or renamed.
        """
        directory, name = os.path.split(self.path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory or ".")
        except OSError as exc:
            raise PidfileError(f"cannot write pidfile {self.path}: {exc.strerror}") from exc
        try:
            os.set_inheritable(fd, False)
            os.fchmod(fd, 0o644)
            os.write(fd, f"{pid}\n".encode())
            if not _lock(fd):
                raise OSError(errno.EAGAIN, "its temporary file is locked by someone else")
            os.rename(tmp, self.path)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise PidfileError(f"cannot write pidfile {self.path}: {exc.strerror}") from exc
        os.close(self.fd)  # the old inode's lock goes with it; the path names ours
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
        """Close this process's descriptor (and so its lock) without touching the file."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def default_pidfile(port: int | None = None, unix: str | None = None) -> str:
    """The pidfile of a daemon started without ``--pidfile``: where it writes it and where
    ``stop`` and ``status`` look for it.

    ``aecho-PORT.pid``, or ``aecho-unix-NAME-HASH.pid`` for a Unix socket whose file is
    named NAME (HASH: of its whole path, so two sockets of one name in two directories
    have a pidfile each), in ``$XDG_RUNTIME_DIR`` (when it is an absolute path to a
    directory), else in ``/tmp``.
    """
    if unix:
        path = os.path.abspath(unix)
        digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        name = f"unix-{os.path.basename(path)}-{digest}"
    else:
        name = str(port)
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if not (os.path.isabs(base) and os.path.isdir(base)):
        base = "/tmp"
    return os.path.join(base, f"aecho-{name}.pid")


# -- looking from outside --------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """What a pidfile says, checked against the process that holds its lock.

    ``state``: ``absent`` (no file), ``stale`` (nobody holds the lock, and its pid is
    gone or is no aecho server), ``starting`` (locked, no pid written yet), ``running``
    (the pid in the file holds the lock and is an aecho server), ``unlocked`` (nobody
    holds the lock, yet its pid is a running aecho server: the file was replaced, by an
    editor say, so it cannot vouch for the pid), ``foreign`` (locked, but the pid in
    the file is not the holder, or the holder is not an aecho server, or what the file
    holds is no pid at all: see :func:`parse_pid`).  Only ``running`` may be signalled.
    """

    state: str
    pid: int | None = None
    holder: int | None = None
    why: str = ""


def pid_max() -> int:
    """The highest pid this system hands out (``/proc/sys/kernel/pid_max``)."""
    try:
        with open("/proc/sys/kernel/pid_max", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return PID_MAX_LIMIT


def first_line(text: str) -> str:
    """The first line of a pidfile's content, without surrounding blanks."""
    return text.split("\n", 1)[0].strip()


def parse_pid(text: str) -> int | None:
    """The pid on the first line, or None when there is none a server could have.

    ASCII digits only, above 1 and at most ``pid_max``: a pidfile that says 0 or -1
    would have ``kill()`` signal a process group or every process, and 1 is init.
    """
    first = first_line(text)
    if not (first.isascii() and first.isdigit()) or len(first) > len(str(PID_MAX_LIMIT)):
        return None
    pid = int(first)
    return pid if 1 < pid <= pid_max() else None


def probe(path: str) -> Probe:
    """Look at the pidfile at ``path`` and the process holding it.

    Raises:
        OSError: the pidfile exists but cannot be read (a symlink, not a regular file,
            no permission).
    """
    try:
        fd = _open(path, os.O_RDONLY)
    except FileNotFoundError:
        return Probe("absent")
    try:
        holder = lock_holder(fd)
        chunks = []
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
            if len(chunks) > 16:
                break
        text = b"".join(chunks).decode("utf-8", "replace")
        pid = parse_pid(text)
    finally:
        os.close(fd)
    garbage = (
        f"it holds {first_line(text)[:40]!r}, not a pid a server can have"
        if first_line(text)
        else ""
    )
    if pid is None and garbage:
        if holder is None:
            return Probe("stale", None, None, garbage)
        return Probe("foreign", None, holder, f"{garbage} (pid {holder} holds its lock)")
    if holder is None:
        if pid is not None and is_live_server(pid):
            return Probe(
                "unlocked",
                pid,
                None,
                f"pid {pid} is an aecho server but does not hold its lock (was the file replaced?)",
            )
        return Probe("stale", pid)
    if pid is None:
        return Probe("starting", None, holder)
    if pid != holder:
        return Probe(
            "foreign",
            pid,
            holder,
            f"it names pid {pid}, but pid {holder} holds its lock",
        )
    title = process_title(pid)
    if not title.startswith(SERVER_TITLES):
        shown = printable(title.decode("utf-8", "replace")[:60]) or "unknown"
        return Probe("foreign", pid, holder, f"pid {pid} is not an aecho server ({shown})")
    return Probe("running", pid, holder)


def process_title(pid: int) -> bytes:
    """What ``ps`` shows for ``pid`` (its command line, NULs as spaces); b"" if unknown."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").strip()
    except OSError:
        return b""


def is_live_server(pid: int) -> bool:
    """Whether ``pid`` runs, and its process title says it is an aecho server."""
    return pid_alive(pid) and process_title(pid).startswith(SERVER_TITLES)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie waiting for its parent.

    False for a number no process can have: ``kill(0)`` and ``kill(-1)`` would ask
    about a process group or every process.
    """
    if not 0 < pid <= PID_MAX_LIMIT:
        return False
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


def already_running(path: str) -> str:
    """The one-line refusal when a live server holds ``path``."""
    with contextlib.suppress(OSError):
        found = probe(path)
        if found.holder is not None:
            return (
                f"already running (pid {found.holder}, pidfile {path}): "
                f"stop it with 'aecho stop --pidfile {path}' or use another --pidfile"
            )
    return f"pidfile {path} is held by another aecho server: use another --pidfile"


def check_free(path: str) -> None:
    """Fail now if a live server holds ``path`` (a daemon locks it only after detaching).

    Raises:
        PidfileError: it is held, or it cannot be used (a symlink, a directory, ...).
    """
    try:
        found = probe(path)
    except OSError as exc:
        raise PidfileError(f"cannot use pidfile {path}: {_reason(exc)}") from exc
    if found.holder is not None:
        raise PidfileError(already_running(path))


def remove_if_stale(path: str) -> None:
    """Remove the pidfile at ``path`` if no process holds its lock."""
    try:
        pidfile = Pidfile.acquire(path)
    except PidfileError:
        return
    pidfile.remove()
