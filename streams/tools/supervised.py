"""`acsr-metrics worker --processes N` seen from outside, as a `Cluster` whose workers are
the supervisor's children: what bench (`--processes-compare`) and the tests scrape.

A child is found by its port: the supervisor's child process whose environment says
`ACSR_WEB_PORT=<port>` (Linux /proc), so a restarted child is found again under its new pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from streams.config import env_name
from streams.kafka.broker import free_port
from streams.tools.replay import Cluster, ReplayError, WorkerProcess, proc_status_kb

PROC = Path("/proc")
PORT_VARIABLE = env_name("web_port").encode()


def parent_pid(stat: str) -> int:
    """The parent pid in a /proc/<pid>/stat line (the command, in parentheses, may hold
    spaces and parentheses itself)."""
    return int(stat.rsplit(")", 1)[1].split()[1])


def child_pids(parent: int, proc: Path = PROC) -> list[int]:
    """The live processes whose parent is `parent`."""
    out = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if parent_pid((entry / "stat").read_text()) == parent:
                out.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return out


def web_port_of(pid: int, proc: Path = PROC) -> int | None:
    """The ACSR_WEB_PORT a process was started with (None: gone, a zombie, or not set)."""
    try:
        environ = (proc / str(pid) / "environ").read_bytes()
    except OSError:
        return None
    for item in environ.split(b"\0"):
        name, _, value = item.partition(b"=")
        if name == PORT_VARIABLE and value.isdigit():
            return int(value)
    return None


def children_by_port(parent: int, proc: Path = PROC) -> dict[int, int]:
    """The supervisor's children, port -> pid."""
    found = {}
    for pid in child_pids(parent, proc):
        port = web_port_of(pid, proc)
        if port is not None:
            found[port] = pid
    return found


def free_ports(count: int, attempts: int = 50) -> int:
    """A base port such that it and the `count - 1` after it are free now."""
    for _ in range(attempts):
        base = free_port()
        if base + count - 1 > 65535:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base + 1, base + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports found")


@dataclass
class ChildWorker(WorkerProcess):
    """A supervisor's child, found by its port; started and stopped by the supervisor."""

    parent: int = 0
    known_pid: int | None = None

    def pid(self) -> int | None:
        """Its current pid (it changes when the supervisor restarts it)."""
        pid = self.known_pid
        if pid is not None and web_port_of(pid) == self.settings.web_port:
            with contextlib.suppress(OSError, ValueError, IndexError):
                if parent_pid((PROC / str(pid) / "stat").read_text()) == self.parent:
                    return pid
        self.known_pid = children_by_port(self.parent).get(self.settings.web_port)
        return self.known_pid

    def start(self) -> None:
        raise NotImplementedError("the supervisor starts its children")

    def alive(self) -> bool:
        return self.pid() is not None

    def signal(self, signum: int) -> None:
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def stop(self, timeout_s: float = 15.0) -> None:
        """The supervisor stops its children."""

    def memory_kb(self) -> dict[str, int]:
        pid = self.pid()
        try:
            return proc_status_kb((PROC / f"{pid}/status").read_text()) if pid else {}
        except OSError:
            return {}


@dataclass
class SupervisedCluster(Cluster):
    """`acsr-metrics worker --processes <count>` in one subprocess; `workers` are its
    children (process i on port base + i), in the supervisor's log."""

    supervisor: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.log_dir / "supervisor.log"

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        settings = self.settings.with_overrides(web_port=free_ports(self.count))
        with self.log_path.open("ab") as log:
            self.supervisor = subprocess.Popen(
                [sys.executable, "-m", "streams", "worker", "--processes", str(self.count)],
                env={**os.environ, **settings.to_env()}, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.workers = [ChildWorker(index, settings.with_overrides(web_port=settings.web_port
                                                                   + index),
                                    self.log_path, parent=self.supervisor.pid)
                        for index in range(self.count)]

    def add_worker(self, index: int, web_port: int | None = None) -> WorkerProcess:
        raise NotImplementedError("the supervisor runs a fixed number of processes")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the supervisor, which stops its children; SIGKILL after `timeout_s`."""
        if self.supervisor is None or self.supervisor.poll() is not None:
            return
        self.supervisor.send_signal(signal.SIGTERM)
        try:
            self.supervisor.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.supervisor.kill()  # its children get SIGTERM (PR_SET_PDEATHSIG)
            self.supervisor.wait()

    def check_alive(self) -> None:
        if self.supervisor is not None and self.supervisor.poll() not in (None, 0):
            raise ReplayError(f"the supervisor exited with {self.supervisor.returncode}; its "
                              f"log ({self.log_path}) ends with:\n"
                              f"{self.workers[0].log_tail() if self.workers else ''}")
