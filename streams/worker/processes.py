"""`acsr-metrics worker --processes N`: N worker processes of one consumer group on one
machine, under a supervisor.

A worker runs its Python under one interpreter lock, so it uses one core; N processes in
the same group (same app id) use N, each on its own partitions. Each child is the same
`acsr-metrics worker` command with its settings in the environment: process i serves on
`web_port + i` and keeps its tables under `<data_dir>/process-<i>`. The supervisor
restarts a child that exits with an exponential back-off, gives up when every child keeps
failing at start (a setting only the worker checks, a port in use), and on SIGTERM or
Ctrl-C stops them all and exits 0.

The pure parts (CPU count, back-off, the children's environment) are separate functions,
tested without processes (tests/test_processes.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from streams.config import ConfigError, Settings, env_name, parse_processes

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")  # where cgroup v1 mounts the controller
PR_SET_PDEATHSIG = 1  # prctl(2)

Say = Callable[[str], None]


# --- how many: the CPUs this process may use ----------------------------------------------


def quota_cpus(quota_us: int, period_us: int) -> int | None:
    """A CFS quota as whole CPUs, rounded up (150000/100000: 2); None for no limit."""
    if quota_us <= 0 or period_us <= 0:
        return None
    return max(1, math.ceil(quota_us / period_us))


def cpu_max_limit(text: str) -> int | None:
    """cgroup v2 `cpu.max` ("max 100000" or "200000 100000") as whole CPUs."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    period = int(parts[1]) if len(parts) > 1 else 100_000
    return quota_cpus(int(parts[0]), period)


def own_cgroup_paths(text: str) -> tuple[str, str]:
    """This process's cgroup paths (v2, v1 cpu controller) from /proc/self/cgroup lines
    `id:controllers:path`; "/" where there is none."""
    v2 = v1 = "/"
    for line in text.splitlines():
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers == "":
            v2 = path or "/"
        elif "cpu" in controllers.split(","):
            v1 = path or "/"
    return v2, v1


def _up_to(base: Path, own: str) -> list[Path]:
    """`base/own` and each parent up to `base`: a parent's quota limits its children too.
    Inside a container the own path often does not exist there (the namespace's root is
    `base` itself), and is then skipped."""
    parts = [part for part in own.split("/") if part]
    return [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _read_limit(directory: Path) -> int | None:
    """The CPU quota set in one cgroup directory (v2 `cpu.max` or v1 cfs files)."""
    try:
        return cpu_max_limit((directory / "cpu.max").read_text())
    except (OSError, ValueError):
        pass
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_cpus(quota, period)


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP
                     ) -> int | None:
    """The tightest CPU quota of this process's cgroups (v2 or v1), in whole CPUs; None
    when no quota is set or the files are missing (not Linux, no cgroup fs)."""
    try:
        v2, v1 = own_cgroup_paths(proc_cgroup.read_text())
    except OSError:
        v2 = v1 = "/"
    directories = _up_to(root, v2) + [path for name in V1_CPU_DIRS
                                      for path in _up_to(root / name, v1)]
    limits = [limit for directory in directories
              if (limit := _read_limit(directory)) is not None]
    return min(limits, default=None)


def affinity_cpus() -> int:
    """The CPUs the scheduler lets this process run on (a container's cpuset, taskset);
    the machine's count only where the platform cannot say."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def usable_cpus(affinity: int, quota: int | None) -> int:
    """The CPUs worth a process each: the affinity, capped by the quota, at least 1."""
    return max(1, min(affinity, quota) if quota is not None else affinity)


def process_count(raw: str, cpus: Callable[[], int] | None = None) -> int:
    """The number of worker processes ACSR_PROCESSES asks for; `auto` is the usable CPUs
    (`cpus`, by default affinity and cgroup quota: never the host's count)."""
    count = parse_processes(raw)
    if count is not None:
        return count
    if cpus is not None:
        return cpus()
    return usable_cpus(affinity_cpus(), cgroup_cpu_limit())


# --- the children ---------------------------------------------------------------------------


def check_ports(settings: Settings, count: int) -> None:
    """Ports web_port .. web_port + count - 1 must exist: refused at start, not by a child."""
    last = settings.web_port + count - 1
    if last > 65535:
        raise ConfigError(f"ACSR_PROCESSES={count} from ACSR_WEB_PORT={settings.web_port} "
                          f"needs ports up to {last}: lower ACSR_WEB_PORT (at most "
                          f"{65536 - count}) or the number of processes")


def child_data_dir(settings: Settings, index: int) -> str:
    """Each process's own tables directory under the data directory."""
    return str(Path(settings.data_dir) / f"process-{index}")


def child_env(settings: Settings, index: int, base: dict[str, str]) -> dict[str, str]:
    """Process `index`'s environment: `base` (PATH, ...) and every setting, with one
    process (no supervisor of its own), its port and its data directory."""
    child = settings.with_overrides(processes="1", web_port=settings.web_port + index,
                                    data_dir=child_data_dir(settings, index))
    return {**base, **child.to_env()}


def worker_command() -> list[str]:
    """The same `acsr-metrics worker`, run by the same interpreter; settings come from the
    environment (flags would take precedence over it)."""
    return [sys.executable, "-m", "streams", "worker"]


def _die_with_supervisor() -> None:
    """In a child before it runs: SIGTERM it when the supervisor dies, even by SIGKILL, so
    no orphan keeps partitions and ports a restarted supervisor's children need (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# --- restarts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """When to restart and when to give up (seconds)."""

    first_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    stable_s: float = 120.0  # a run this long resets the back-off
    quick_s: float = 15.0  # an exit sooner is a failure at start
    give_up_after: int = 5  # every child failed at start this many times in a row: stop
    stop_timeout_s: float = 20.0  # after SIGTERM, then SIGKILL
    poll_s: float = 0.2


def backoff_s(failures: int, policy: Policy = Policy()) -> float:
    """The wait before restart number `failures` since the last stable run: 1, 2, 4, ...
    up to the maximum."""
    if failures <= 0:
        return 0.0
    return min(policy.max_backoff_s, policy.first_backoff_s * 2 ** min(failures - 1, 30))


def after_exit(failures: int, quick: int, ran_s: float, policy: Policy = Policy()
               ) -> tuple[int, int]:
    """A child's (failures, failures at start in a row) once it exited after `ran_s`: a
    stable run starts the back-off again, a run past start breaks the row."""
    failures = 1 if ran_s >= policy.stable_s else failures + 1
    quick = quick + 1 if ran_s < policy.quick_s else 0
    return failures, quick


def describe_exit(code: int) -> str:
    """An exit status as an operator reads it: the code, or the signal that killed it."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    meaning = {0: "", 2: " (configuration error)", 3: " (broker unavailable)",
               4: " (Faust or aiokafka version not supported)"}.get(code, "")
    return f"exit code {code}{meaning}"


# --- the supervisor ---------------------------------------------------------------------


@dataclass
class Child:
    """One worker process slot: its index, environment and restart state."""

    index: int
    port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0  # exits since its last stable run: the back-off's exponent
    quick: int = 0  # failures at start in a row
    restart_at: float | None = None
    last_code: int | None = None

    @property
    def name(self) -> str:
        pid = self.process.pid if self.process is not None else "-"
        return f"process {self.index} (pid {pid}, port {self.port})"


def stamp_say(text: str) -> None:
    """One supervisor line on stderr, timestamped like the workers' own logs."""
    print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] acsr-metrics supervisor: {text}",
          file=sys.stderr, flush=True)


class Supervisor:
    """Starts the children, restarts the ones that exit, stops them all on a signal."""

    def __init__(self, settings: Settings, count: int, policy: Policy = Policy(),
                 command: Sequence[str] | None = None, say: Say = stamp_say) -> None:
        check_ports(settings, count)
        base = {k: v for k, v in os.environ.items() if not k.startswith("ACSR_")}
        self.children = [Child(i, settings.web_port + i, child_env(settings, i, base))
                         for i in range(count)]
        self.policy = policy
        self.command = list(command or worker_command())
        self.say = say
        self.signals = 0  # SIGTERM / SIGINT received: the first stops, the second kills

    def run(self) -> int:
        """Until a signal (0) or every child keeps failing at start (its exit code)."""
        handled = (signal.SIGTERM, signal.SIGINT)
        previous = {signum: signal.signal(signum, self._on_signal) for signum in handled}
        try:
            for child in self.children:
                self._start(child)
            while not self.signals:
                code = self.step(time.monotonic())
                if code is not None:
                    return code
                time.sleep(self.policy.poll_s)
            self.say("stopping every process (signal received)")
            return 0
        finally:
            self.stop_all()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1

    def _start(self, child: Child) -> None:
        child.process = subprocess.Popen(
            self.command, env=child.env, stdin=subprocess.DEVNULL,
            # Ctrl-C reaches the supervisor only, which stops the children in order.
            start_new_session=True,
            preexec_fn=_die_with_supervisor if sys.platform.startswith("linux") else None)
        child.started_at = time.monotonic()
        child.restart_at = None
        self.say(f"{child.name} started, data in {child.env[env_name('data_dir')]}")

    def step(self, now: float) -> int | None:
        """Reap the children that exited, restart the ones whose back-off is over; an exit
        code when every child failed at start `give_up_after` times in a row."""
        for child in self.children:
            if child.process is not None and child.process.poll() is not None:
                self._exited(child, child.process.returncode, now)
            elif child.restart_at is not None and now >= child.restart_at:
                self._start(child)
        if all(child.quick >= self.policy.give_up_after for child in self.children):
            codes = sorted({child.last_code for child in self.children
                            if child.last_code is not None})
            self.say(f"giving up: every process failed at start {self.policy.give_up_after} "
                     f"times in a row, last with {', '.join(describe_exit(c) for c in codes)};"
                     " the errors are in the processes' output above")
            return next((code for code in codes if code > 0), 1)
        return None

    def _exited(self, child: Child, code: int, now: float) -> None:
        ran_s = now - child.started_at
        child.failures, child.quick = after_exit(child.failures, child.quick, ran_s,
                                                 self.policy)
        child.last_code = code
        delay = backoff_s(child.failures, self.policy)
        self.say(f"{child.name} exited unexpectedly, {describe_exit(code)}, after "
                 f"{ran_s:.1f}s; restarting it in {delay:g}s (restart {child.failures} "
                 "since its last stable run)")
        child.process = None
        child.restart_at = now + delay

    def stop_all(self) -> None:
        """SIGTERM to every child, a wait, then SIGKILL to those still running (at once on a
        second signal)."""
        running = [c.process for c in self.children if c.process and c.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.policy.stop_timeout_s
        stop_signals = self.signals
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:
            if self.signals > max(1, stop_signals):
                break  # asked again: do not wait
            time.sleep(0.1)
        for process in running:
            if process.poll() is None:
                self.say(f"pid {process.pid} did not stop within "
                         f"{self.policy.stop_timeout_s:g}s: killing it")
                process.kill()
            process.wait()


def supervise(settings: Settings, count: int, policy: Policy = Policy()) -> int:
    """`worker --processes N` with N > 1: say what runs where, then supervise."""
    supervisor = Supervisor(settings, count, policy)
    last = settings.web_port + count - 1
    stamp_say(f"{count} worker processes of group {settings.app_id}, /metrics on "
              f"{settings.web_host} ports {settings.web_port}-{last}, data under "
              f"{settings.data_dir}/process-<i>")
    if count > settings.partitions:
        stamp_say(f"warning: {count} processes but ACSR_PARTITIONS={settings.partitions}: a "
                  "process without a partition idles (docs/performance.md, processes)")
    cpus = usable_cpus(affinity_cpus(), cgroup_cpu_limit())
    if count > cpus:
        stamp_say(f"warning: {count} processes on {cpus} usable CPUs: they share them")
    return supervisor.run()
