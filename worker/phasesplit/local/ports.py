"""The router's port in local mode: free before anything loads, and, once `/health` answers there,
held by the launcher's own router (not by another `phasesplit local` on the same port)."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import urllib.error
import urllib.request

LISTEN = "0A"  # the TCP state of a listening socket in /proc/net/tcp


class PortInUse(ValueError):
    pass


def check_free(host: str, port: int, setting: str) -> None:
    """PortInUse (one line: the port, who holds it, and `setting`, what sets it) unless `port` can be
    listened on. Bound as the router binds (SO_REUSEADDR), so closed connections do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return
        except OSError as exc:
            why = exc.strerror or str(exc)
    raise PortInUse(f"port {port} on {host} is not free ({why}): {holder(host, port)}; set another with {setting} "
                    f"(0 picks a free one)")


def holder(host: str, port: int) -> str:
    """Who listens on `port`, as far as this machine tells: a router's `/health`, a process id."""
    pids = listening_pids(port)
    who = f"held by pid {', '.join(map(str, pids))}" if pids else "held by another program"
    if _answers_health(host, port):
        who = f"a phasesplit router answers there ({who})"
    return who


def _answers_health(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=0.2) as reply:  # a router answers in ms
            return "status" in json.loads(reply.read())
    except urllib.error.HTTPError as reply:   # 503: a router without ready workers
        try:
            return "status" in json.loads(reply.read())
        except ValueError:
            return False
    except (OSError, ValueError):
        return False


def listening_inodes(port: int) -> set[int] | None:
    """The inodes of the sockets listening on `port` (IPv4 and IPv6); None where /proc does not tell."""
    inodes, read_any = set(), False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = pathlib.Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        read_any = True
        for row in rows:
            fields = row.split()
            if fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes if read_any else None


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process `pid` holds open (empty if it cannot be read)."""
    fd_dir = pathlib.Path(f"/proc/{pid}/fd")
    inodes = set()
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd_dir / fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds the socket listening on `port`; True where /proc cannot tell."""
    listening = listening_inodes(port)
    return listening is None or bool(listening & socket_inodes(pid))


def listening_pids(port: int) -> list[int]:
    """The processes (of those this user may inspect) that hold a socket listening on `port`."""
    listening = listening_inodes(port)
    if not listening:
        return []
    return sorted(int(pid) for pid in os.listdir("/proc") if pid.isdigit() and listening & socket_inodes(int(pid)))
