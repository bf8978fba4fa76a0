"""What ``ps`` shows for each aecho process; ``status`` reads the address back from it."""

from __future__ import annotations

SERVER = "aecho: server"
SUPERVISOR = "aecho: supervisor"


def server_title(address: str, worker: int | None = None, workers: int = 1) -> str:
    if worker is None:
        return f"{SERVER} {address}"
    return f"{SERVER} {address} (worker {worker}/{workers})"


def supervisor_title(address: str, workers: int) -> str:
    return f"{SUPERVISOR} {address} ({workers} worker{'s' if workers != 1 else ''})"


def address_from_title(title: str) -> str:
    """The address part of a server's or supervisor's title ("" if it is neither)."""
    for prefix in (SERVER, SUPERVISOR):
        if title.startswith(prefix + " "):
            return title[len(prefix) + 1 :].split(" (", 1)[0]
    return ""


def set_process_title(title: str) -> None:
    """Show ``title`` in ps/top."""
    from setproctitle import setproctitle

    setproctitle(title)
