"""``serve --workers N``: a supervisor that runs N serving processes on one port.

The supervisor has bound every listener before it starts (errors reach the
terminal), runs no event loop and no threads (a ``select`` loop over a signal
pipe, the children's notify socket, their stats channels and the metrics port), and
forks each serving process (``process.children``), which starts its own loop.

- Sharing the port: each serving process gets its own SO_REUSEPORT listener and the
  kernel spreads new connections over them.  The supervisor keeps a copy of every
  listener, so a process that dies takes no accept queue with it: the queue waits
  for its replacement, which takes over the same socket.  Unix sockets and
  systemd's sockets can only be shared: every process accepts from the same one.
- Supervision: a serving process that dies is replaced.  One that dies before it is
  ready stops everything with its own one-line error at start-up, or after
  START_FAILURES attempts in a row later on: no restart loop.
- Signals (nginx and gunicorn conventions): TERM/INT stop every process gracefully
  (a second one forces them, a third kills); HUP replaces the serving processes one
  at a time, each replacement serving before its predecessor retires, listeners
  never closed; USR1 reopens log files everywhere; TTIN/TTOU add or retire one
  serving process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aecho.address import format_address
from aecho.config import ServerConfig
from aecho.process.children import ERROR_FIELD, SUPERVISOR_SIGNALS, Child, spawn
from aecho.process.daemon import Readiness, ready_timeout
from aecho.process.logs import reopen_log_files
from aecho.process.pidfile import Pidfile
from aecho.process.serving import log_fd_limit
from aecho.process.signals import release, take_stop
from aecho.process.systemd import LISTEN_FIELD, Notification, NotifyReceiver, notify
from aecho.process.titles import set_process_title, supervisor_title
from aecho.server.limits import SharedTable
from aecho.server.listeners import StartupError, bind_sibling, reuses_port
from aecho.server.stats import Stats
from aecho.text import printable

log = logging.getLogger("aecho.supervisor")

# Rows of the shared limits table: serving processes alive at once, reloads included.
MAX_ROWS = 1024
# A serving process that fails before it is ready this many times in a row stops all.
START_FAILURES = 3
# Past --graceful-timeout, how long serving processes get to clean up before SIGKILL.
STOP_MARGIN_S = 5.0
TICK_S = 0.5


@dataclass(eq=False)
class Slot:
    """A position among the serving processes, and the listeners that go with it."""

    index: int
    own: list[socket.socket]  # its SO_REUSEPORT listeners
    shared: list[socket.socket]  # listeners every process accepts from
    child: Child | None = None
    incoming: Child | None = None  # a replacement starting during a reload
    failures: int = 0
    respawn_at: float | None = None

    @property
    def sockets(self) -> list[socket.socket]:
        return self.own + self.shared


@dataclass
class _Stop:
    forced_by: int | None = None
    deadline: float = 0.0
    signals: int = 0
    fatal: str | None = None
    exited: dict[int, str] = field(default_factory=dict)


class Supervisor:
    """Starts, watches, replaces, reloads and stops the serving processes."""

    def __init__(
        self,
        config: ServerConfig,
        sockets: list[socket.socket],
        readiness: Readiness,
        pidfile: Pidfile | None,
        fd_limit: tuple[int, int],
    ) -> None:
        self.config = config
        self.readiness = readiness
        self.pidfile = pidfile
        self.fd_limit = fd_limit
        self.ready_limit = ready_timeout()  # checked by serve() before anything started
        self.first_own = [s for s in sockets if reuses_port(s)]
        self.shared = [s for s in sockets if not reuses_port(s)]
        self.address = " ".join(format_address(s.getsockname()) for s in sockets)
        self.table = SharedTable(MAX_ROWS, sketch=config.max_connections_per_ip > 0)
        self.free_rows = list(range(MAX_ROWS - 1, -1, -1))
        self.slots: list[Slot] = []
        self.target = config.workers  # how many serving processes there should be
        self.children: dict[int, Child] = {}
        self.retired = Stats()  # the counters of serving processes that have exited
        self.notify = NotifyReceiver()
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.stop: _Stop | None = None
        self.serving = False  # every serving process was ready at least once
        self.reload: list[Slot] = []
        self.reload_size = self.reloaded = 0  # of the reload under way
        self.metrics: Any = None  # a process.scrape.MetricsEndpoint with --metrics-port

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; 0 after a graceful stop, 128 + signal after a forced one.

        Raises:
            StartupError: a serving process could not start (its own error), or the
                metrics port cannot be bound.
        """
        early = take_stop()  # a TERM or INT while starting: no serving process is forked
        previous = self._install_signals()
        try:
            if early is not None:
                log.info("%s while starting: stopping before serving", early.name)
                self.readiness.stopped(early.name)
                return 0
            if self.config.metrics_port is not None:
                self._start_metrics(self.config.metrics_port)
            self.selector.register(self.notify.sock, selectors.EVENT_READ, self._notified)
            for _ in range(self.config.workers):
                self._add_slot()
            while not (self.stop is not None and not self.children):
                for key, _ in self.selector.select(self._timeout()):
                    key.data()
                self._reap()
                self._tick()
        finally:
            self._close(previous)
        if self.stop is not None and self.stop.fatal is not None:
            raise StartupError(self.stop.fatal)
        forced = self.stop.forced_by if self.stop is not None else None
        return 0 if forced is None else 128 + forced

    def _start_metrics(self, port: int) -> None:
        """Raises: StartupError: prometheus_client is missing or the port is busy."""
        try:
            from aecho.process.scrape import MetricsEndpoint
        except ImportError:
            raise StartupError(
                "--metrics-port needs prometheus_client: pip install 'aecho[metrics]'"
            ) from None
        self.metrics = MetricsEndpoint(port, self.selector)
        self.metrics.start(self._scrape)

    def _timeout(self) -> float:
        return 0.05 if self.stop is not None else TICK_S

    def _install_signals(self) -> dict[signal.Signals, Any]:
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno())
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in SUPERVISOR_SIGNALS}
        self.selector.register(self.wake_r, selectors.EVENT_READ, self._signalled)
        release()  # what came while ``aecho serve`` started is handled now
        return previous

    def _close(self, previous: dict[signal.Signals, Any]) -> None:
        for child in self.children.values():  # only after a failure in the loop itself
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
        signal.set_wakeup_fd(-1)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if self.metrics is not None:
            self.metrics.close()
        self.selector.close()
        self.notify.close()
        for sock in (self.wake_r, self.wake_w, *self._listeners()):
            sock.close()
        if self.config.unix:
            with contextlib.suppress(OSError):
                os.unlink(self.config.unix)

    # -- serving processes -------------------------------------------------------------------

    def _add_slot(self) -> None:
        index = len(self.slots) + 1
        own = (
            self.first_own
            if index == 1
            else [bind_sibling(s, self.config.effective_backlog) for s in self.first_own]
        )
        slot = Slot(index, own, self.shared)
        self.slots.append(slot)
        slot.child = self._spawn(slot)

    def _spawn(self, slot: Slot) -> Child:
        row = self.free_rows.pop()
        self.table.clear(row)
        child = spawn(
            self.config,
            slot.sockets,
            slot.index,
            self.target,
            row,
            self.table,
            self.notify.path,
        )
        self.children[child.pid] = child
        self.selector.register(child.control, selectors.EVENT_READ, child.read_stats)
        log.debug("started serving process %d (pid %d)", slot.index, child.pid)
        return child

    def _signal(self, child: Child, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, sig)

    def _notified(self) -> None:
        while (note := self.notify.receive(0)) is not None:
            child = self.children.get(note.pid or -1)
            if child is not None:
                self._on_note(child, note)

    def _on_note(self, child: Child, note: Notification) -> None:
        if ERROR_FIELD in note.fields:
            child.error = printable(note.fields[ERROR_FIELD])
        if not note.ready or child.state != "starting":
            return
        child.state = "ready"
        slot = self._slot_of(child)
        if slot is None:
            return
        slot.failures = 0
        if slot.incoming is child:  # a reload: the replacement serves, the old one retires
            old, slot.child, slot.incoming = slot.child, child, None
            if old is not None:
                self._retire(old)
            self.reloaded += 1
            log.info("reload: serving process %d replaced (pid %d)", slot.index, child.pid)
            if not self.reload:
                log.info("reload: every serving process replaced")
        if not self.serving and all(s.child and s.child.state == "ready" for s in self.slots):
            self._announce()

    def _announce(self) -> None:
        self.serving = True
        log_fd_limit(self.fd_limit, self.config.max_connections)
        n = len(self.slots)
        log.info("serving on %s with %d worker%s", self.address, n, "s" if n != 1 else "")
        address = ", ".join(
            format_address(s.getsockname()) for s in [*self.first_own, *self.shared]
        )
        listen = " ".join(format_address(s.getsockname()) for s in [*self.first_own, *self.shared])
        notify(
            f"READY=1\nSTATUS=serving on {address} with {n} workers\n"
            f"MAINPID={os.getpid()}\n{LISTEN_FIELD}={listen}"
        )
        self.readiness.ready(address)

    def _listeners(self) -> list[socket.socket]:
        return [*self.shared, *self.first_own, *(s for slot in self.slots for s in slot.own)]

    def _retire(self, child: Child) -> None:
        child.state = "stopping"
        self._signal(child, signal.SIGTERM)

    def _slot_of(self, child: Child) -> Slot | None:
        for slot in self.slots:
            if child is slot.child or child is slot.incoming:
                return slot
        return None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is not None:
                self._exited(child, status)

    def _exited(self, child: Child, status: int) -> None:
        child.read_stats()  # its last word, if it had the time to say it
        if child.stats is not None:
            self.retired.add(child.stats)
        self.selector.unregister(child.control)
        child.control.close()
        self.table.clear(child.row)
        self.free_rows.append(child.row)
        how = _describe_status(status)
        slot = self._slot_of(child)
        if self.stop is not None or slot is None:
            log.debug("serving process %d (pid %d) %s", child.index, child.pid, how)
            return
        if child is slot.incoming:
            slot.incoming = None
            self._abandon_reload(slot.index, child.error or f"it {how}")
            return
        slot.child = None
        if child.state == "ready":
            log.warning("serving process %d (pid %d) %s; replacing it", slot.index, child.pid, how)
            slot.respawn_at = time.monotonic()
            return
        slot.failures += 1
        why = child.error or f"serving process {slot.index} {how} before it was ready"
        if not self.serving or slot.failures >= START_FAILURES:
            self._begin_stop(None, fatal=why)
            return
        log.warning("%s; retrying (%d of %d)", why, slot.failures, START_FAILURES)
        slot.respawn_at = time.monotonic() + 0.25 * 2**slot.failures

    def _tick(self) -> None:
        now = time.monotonic()
        if self.stop is not None:
            if now > self.stop.deadline:
                for child in self.children.values():
                    self._signal(child, signal.SIGKILL)
                self.stop.deadline = float("inf")
            return
        limit = self.ready_limit
        for child in list(self.children.values()):
            if child.state == "starting" and now - child.born > limit:
                child.error = child.error or (
                    f"serving process {child.index} was not ready within {limit:g}s"
                )
                self._signal(child, signal.SIGKILL)
        for slot in self.slots:
            if slot.respawn_at is not None and now >= slot.respawn_at and slot.child is None:
                slot.respawn_at = None
                slot.child = self._spawn(slot)
        if self.reload and not any(s.incoming for s in self.slots):
            slot = self.reload.pop(0)
            if slot in self.slots and slot.child is not None and slot.child.state == "ready":
                try:
                    slot.incoming = self._spawn(slot)
                except OSError as exc:
                    self._abandon_reload(slot.index, f"cannot fork: {exc.strerror}")

    def _abandon_reload(self, index: int, why: str) -> None:
        """One line: why the reload stopped, and that the old processes keep serving."""
        self.reload.clear()
        done = self.reloaded
        kept = (
            "the old serving processes keep serving"
            if not done
            else f"{done} of {self.reload_size} were replaced; the others keep serving"
        )
        log.error(
            "reload abandoned: new serving process %d did not start: %s; %s",
            index,
            why,
            kept,
        )

    # -- signals -----------------------------------------------------------------------------

    def _signalled(self) -> None:
        try:
            data = self.wake_r.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        for signum in data:
            self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        name = _name(signum)
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._begin_stop(signum)
        elif self.stop is not None or signum == signal.SIGCHLD:
            return
        elif signum == signal.SIGHUP:
            log.info("%s: replacing the serving processes one at a time", name)
            self.reload = [s for s in self.slots if s.child is not None]
            self.reload_size, self.reloaded = len(self.reload), 0
        elif signum == signal.SIGUSR1:
            reopen_log_files(redirect=self.config.daemon)
            log.info("%s: reopened log files", name)
            for child in self.children.values():
                self._signal(child, signal.SIGUSR1)
        elif signum == signal.SIGTTIN:
            self.target += 1
            self._add_slot()
            self._retitle()
            log.info("%s: %d serving processes", name, len(self.slots))
        elif signum == signal.SIGTTOU:
            self._remove_slot()
            log.info("%s: %d serving processes", name, len(self.slots))

    def _remove_slot(self) -> None:
        if len(self.slots) <= 1:
            log.warning("SIGTTOU: keeping the last serving process")
            return
        slot = self.slots.pop()
        self.target = len(self.slots)
        self.reload = [s for s in self.reload if s is not slot]
        for child in (slot.child, slot.incoming):
            if child is not None:
                self._retire(child)
        # The retiring process holds its own copies until its graceful stop closes them.
        for sock in slot.own:
            sock.close()
        self._retitle()

    def _retitle(self) -> None:
        set_process_title(supervisor_title(self.address, self.target))
        for child in self.children.values():
            if child.state != "stopping":
                child.tell(b"workers %d" % self.target)

    def _begin_stop(self, signum: int | None, fatal: str | None = None) -> None:
        stop = self.stop
        if stop is None:
            stop = self.stop = _Stop(fatal=fatal)
            stop.deadline = time.monotonic() + self.config.graceful_timeout + STOP_MARGIN_S
            if signum is not None and not self.serving:
                log.info("%s while starting: stopping before serving", _name(signum))
                self.readiness.stopped(_name(signum))
            elif signum is not None:
                n, grace = len(self.children), self.config.graceful_timeout
                log.info("%s: stopping %d serving processes (grace %.3gs)", _name(signum), n, grace)
            notify("STOPPING=1")
            # Each serving process takes what its listener's queue holds, then closes
            # it; the supervisor's copies would keep the listeners open after that.
            for sock in self._listeners():
                sock.close()
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
            self.reload.clear()
        sig = signal.SIGTERM
        if signum is not None:
            stop.signals += 1
            if stop.signals == 2:
                stop.forced_by = signum
                log.warning("%s again: forcing every serving process to stop", _name(signum))
                # Not TERM again: two of one signal can arrive as one, which would
                # leave a serving process stopping gracefully.
                sig = signal.SIGINT
            elif stop.signals >= 3:
                log.warning("%s a third time: killing the serving processes", _name(signum))
                sig = signal.SIGKILL
        for child in self.children.values():
            if sig == signal.SIGTERM and child.state == "stopping":
                # Retired by a reload or TTOU: it already has its TERM and is finishing
                # its connections; another would count as the second, which forces.
                continue
            child.state = "stopping"
            self._signal(child, sig)

    # -- metrics -----------------------------------------------------------------------------

    def _scrape(self, done: Callable[[list[tuple[dict[str, str] | None, Stats]]], None]) -> None:
        """Ask every serving process for its counters; ``done`` gets them with the retired."""
        live = [c for c in self.children.values() if c.state != "starting" and c.ask_stats()]
        waiting = {c.pid for c in live}
        deadline = time.monotonic() + 1.0
        while waiting and (remaining := deadline - time.monotonic()) > 0:
            controls = {c.control.fileno(): c for c in live if c.pid in waiting}
            sel = selectors.DefaultSelector()
            try:
                for fd in controls:
                    sel.register(fd, selectors.EVENT_READ)
                for key, _ in sel.select(remaining):
                    child = controls[key.fd]
                    if child.read_stats():
                        waiting.discard(child.pid)
            finally:
                sel.close()
        parts: list[tuple[dict[str, str] | None, Stats]] = [
            ({"worker": str(c.index)}, c.stats) for c in live if c.stats is not None
        ]
        parts.append((None, self.retired))
        done(parts)


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"
