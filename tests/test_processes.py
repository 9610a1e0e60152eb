"""`acsr-metrics worker --processes N`: the CPU count, the setting, the back-off, the
supervisor with stand-in children, and N real workers against a broker."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest

from streams.config import ConfigError, Settings, from_env
from streams.metrics.exporter import metric_sums
from streams.tools import bench
from streams.tools.cli import build_parser, main
from streams.tools.replay import create_topics, produce, wait_processed
from streams.tools.supervised import ChildWorker, SupervisedCluster, child_pids
from streams.worker import processes
from streams.worker.processes import (
    Policy,
    Supervisor,
    after_exit,
    backoff_s,
    cgroup_cpu_limit,
    child_env,
    cpu_max_limit,
    describe_exit,
    own_cgroup_paths,
    process_count,
    usable_cpus,
)

from .cluster_helpers import run_settings
from .conftest import BrokerInfo
from .traffic import generate

# --- the CPUs this process may use ---------------------------------------------------------


def _files(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _limit(tmp_path: Path, files: dict[str, str], own: str | None = "0::/\n") -> int | None:
    root = _files(tmp_path / "cgroup", files)
    root.mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc-self-cgroup"
    if own is not None:
        proc.write_text(own)
    return cgroup_cpu_limit(root, proc)


@pytest.mark.parametrize(("text", "cpus"), [
    ("max 100000\n", None), ("200000 100000\n", 2), ("150000 100000", 2),
    ("50000 100000", 1), ("400000 200000", 2), ("max", None), ("", None),
])
def test_cpu_max_is_rounded_up_to_whole_cpus(text: str, cpus: int | None) -> None:
    assert cpu_max_limit(text) == cpus


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    assert _limit(tmp_path, {"cpu.max": "300000 100000\n"}) == 3
    assert _limit(tmp_path, {"cpu.max": "max 100000\n"}) is None


def test_cgroup_v2_takes_the_tightest_of_its_own_group_and_its_parents(tmp_path: Path) -> None:
    files = {"cpu.max": "max 100000\n", "app.slice/cpu.max": "200000 100000\n",
             "app.slice/worker.scope/cpu.max": "max 100000\n"}
    assert _limit(tmp_path, files, own="0::/app.slice/worker.scope\n") == 2


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    v1 = "4:memory:/x\n2:cpu,cpuacct:/\n"
    assert _limit(tmp_path, {"cpu,cpuacct/cpu.cfs_quota_us": "250000\n",
                             "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, own=v1) == 3
    assert _limit(tmp_path / "unlimited", {"cpu/cpu.cfs_quota_us": "-1\n",
                             "cpu/cpu.cfs_period_us": "100000\n"}, own=v1) is None


def test_no_cgroup_files_no_limit(tmp_path: Path) -> None:
    assert _limit(tmp_path / "a", {}) is None
    assert _limit(tmp_path / "b", {}, own=None) is None  # no /proc/self/cgroup either
    assert _limit(tmp_path / "c", {"cpu.max": "garbage"}) is None


def test_own_cgroup_paths() -> None:
    assert own_cgroup_paths("0::/a/b\n") == ("/a/b", "/")
    assert own_cgroup_paths("3:cpuset:/\n1:cpu,cpuacct:/docker/x\n0::/\n") == ("/", "/docker/x")


@pytest.mark.parametrize(("affinity", "quota", "cpus"), [
    (8, 2, 2), (2, None, 2), (2, 8, 2), (1, None, 1), (4, 0, 1),
])
def test_usable_cpus_are_the_affinity_capped_by_the_quota(affinity: int, quota: int | None,
                                                          cpus: int) -> None:
    assert usable_cpus(affinity, quota) == cpus


def test_auto_is_the_usable_cpus_never_the_hosts_count(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    monkeypatch.setattr(processes.os, "sched_getaffinity", lambda pid: {0, 3, 5})
    monkeypatch.setattr(processes.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(processes, "cgroup_cpu_limit", lambda: None)
    assert process_count("auto") == 3
    monkeypatch.setattr(processes, "cgroup_cpu_limit", lambda: 2)
    assert process_count("AUTO") == 2
    assert process_count("auto", cpus=lambda: 7) == 7
    assert process_count("4") == 4


# --- the setting --------------------------------------------------------------------------


def test_the_setting_takes_a_count_or_auto() -> None:
    assert Settings().processes == "1"
    assert from_env({"ACSR_PROCESSES": "4"}).processes == "4"
    assert from_env({"ACSR_PROCESSES": "auto"}).processes == "auto"


@pytest.mark.parametrize("raw", ["0", "-1", "two", "1.5", "auto2", " ", "+2"])
def test_a_bad_process_count_is_refused_naming_the_setting(raw: str) -> None:
    with pytest.raises(ConfigError, match=r"ACSR_PROCESSES \(worker --processes\).*'auto'"):
        Settings(processes=raw).validate()


def test_a_bad_process_flag_exits_2_before_anything_starts(capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    assert main(["worker", "--processes", "0"]) == 2
    assert "ACSR_PROCESSES (worker --processes) '0' must be" in capsys.readouterr().err


def test_ports_beyond_65535_are_refused() -> None:
    with pytest.raises(ConfigError, match="needs ports up to 65536"):
        Supervisor(Settings(web_port=65535), 2)


# --- back-off and restarts ----------------------------------------------------------------


def test_the_back_off_doubles_from_1s_to_30s() -> None:
    assert [backoff_s(n) for n in range(8)] == [0, 1, 2, 4, 8, 16, 30, 30]
    assert backoff_s(10_000) == 30


def test_a_stable_run_resets_the_back_off_and_a_run_past_start_the_give_up_count() -> None:
    policy = Policy(stable_s=120, quick_s=15)
    assert after_exit(0, 0, 1.0, policy) == (1, 1)
    assert after_exit(3, 2, 1.0, policy) == (4, 3)
    assert after_exit(3, 2, 60.0, policy) == (4, 0)
    assert after_exit(5, 0, 300.0, policy) == (1, 0)


def test_exits_read_as_an_operator_reads_them() -> None:
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(2) == "exit code 2 (configuration error)"
    assert describe_exit(1) == "exit code 1"


def test_each_child_has_its_port_data_directory_and_one_process(tmp_path: Path) -> None:
    settings = Settings(web_port=7000, processes="3", data_dir=str(tmp_path), app_id="g")
    env = child_env(settings, 2, {"PATH": "/bin"})
    child = from_env(env)
    assert (child.web_port, child.processes, child.app_id) == (7002, "1", "g")
    assert child.data_dir == str(tmp_path / "process-2")
    assert env["PATH"] == "/bin"


def _sleeper() -> list[str]:
    return [sys.executable, "-c", "import time; time.sleep(60)"]


def test_a_child_that_exits_is_restarted_after_its_back_off(tmp_path: Path) -> None:
    said: list[str] = []
    supervisor = Supervisor(Settings(web_port=7100, data_dir=str(tmp_path)), 2,
                            Policy(stop_timeout_s=5), _sleeper(), said.append)
    try:
        for child in supervisor.children:
            supervisor._start(child)
        first = supervisor.children[1].process
        assert first is not None
        first.kill()
        first.wait()
        now = time.monotonic()
        assert supervisor.step(now) is None
        assert supervisor.children[1].process is None
        assert "process 1 (pid" in said[-1] and "killed by SIGKILL" in said[-1]
        assert "restarting it in 1s" in said[-1]
        supervisor.step(now + 0.5)
        assert supervisor.children[1].process is None  # still backing off
        supervisor.step(now + 1.0)
        again = supervisor.children[1].process
        assert again is not None and again.pid != first.pid and again.poll() is None
    finally:
        supervisor.stop_all()
    assert all(c.process is not None and c.process.poll() is not None
               for c in supervisor.children)


def test_children_that_all_keep_failing_at_start_make_it_give_up(tmp_path: Path) -> None:
    said: list[str] = []
    failing = [sys.executable, "-c", "import sys; sys.exit(2)"]
    policy = Policy(first_backoff_s=0.05, max_backoff_s=0.1, give_up_after=3, poll_s=0.05)
    supervisor = Supervisor(Settings(data_dir=str(tmp_path)), 2, policy, failing, said.append)
    started = time.monotonic()
    assert supervisor.run() == 2
    assert time.monotonic() - started < 20
    assert "giving up: every process failed at start 3 times in a row" in said[-1]
    assert "exit code 2 (configuration error)" in said[-1]


SUPERVISE = textwrap.dedent("""
    import sys
    from streams.config import Settings
    from streams.worker.processes import Supervisor
    command = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]
    sys.exit(Supervisor(Settings(web_port=7200, data_dir=sys.argv[1]), 2,
                        command=command).run())
""")


def test_sigterm_stops_every_child_and_exits_0(tmp_path: Path) -> None:
    """The signal path without Kafka: stand-in children that sleep."""
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISE, str(tmp_path)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert supervisor.stdout is not None
    for _ in range(2):
        assert supervisor.stdout.readline().strip() == b"up"
    children = child_pids(supervisor.pid)
    assert len(children) == 2
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=20) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in children)
    assert b"stopping every process" in supervisor.stderr.read()  # type: ignore[union-attr]


# --- bench --processes-compare --------------------------------------------------------------


def _bench_options(*flags: str) -> bench.BenchOptions:
    return bench.options_from_args(build_parser().parse_args(["bench", *flags]))


def test_the_bench_comparison_is_off_unless_asked() -> None:
    assert not _bench_options().processes_compare
    assert _bench_options("--processes-compare").processes_compare
    for flags in (["--workers", "2"], ["--partitions", "1"]):
        with pytest.raises(ConfigError, match="--processes-compare compares 2 processes"):
            _bench_options("--processes-compare", *flags)


def test_the_bench_comparison_pairs_each_repeat_with_its_one_process_run() -> None:
    assert bench.beside([], [{"rate": 1.0}], processes=2) == {"skipped": True}
    compared = bench.beside([{"rate": 300.0}, {"rate": 150.0}, {"rate": 200.0}],
                            [{"rate": 100.0}, {"rate": 100.0}, {"rate": 200.0}], processes=2)
    assert compared["summary"] == {"min": 150.0, "median": 200.0, "max": 300.0}
    assert compared["ratio_summary"] == {"min": 1.0, "median": 1.5, "max": 3.0}
    summary = {"min": 1.0, "median": 2.0, "max": 3.0}
    processor = dict.fromkeys(("summary", "start_summary", "peak_rss_summary",
                               "samples_summary", "render_ms_summary", "scrape_ms_summary"),
                              summary)
    results = {"config": {"partitions": 4},
               "throughput": {"events": 10, "simulated_hours": 0.1, "ratio": 0.5,
                              "raw": {"summary": summary}, "processor": processor},
               "latency": {"skipped": True}, "memory": {"skipped": True},
               "processes": compared}
    table = bench.format_table(results)
    assert "processor, --processes 2 (ev/s)" in table
    assert "--processes 2 / 1, per run" in table and "1.500" in table
    assert "--processes" not in bench.format_table({**results, "processes": {"skipped": True}})


# --- N real workers against the broker ----------------------------------------------------


async def _page(session: aiohttp.ClientSession, worker: ChildWorker, path: str) -> str | None:
    try:
        async with session.get(f"{worker.url}{path}") as response:
            return await response.text() if response.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


COUNTS = ("acsr_events_total", "acsr_events_invalid_total", "acsr_events_duplicate_total")


async def _group_figures(workers: list[ChildWorker], valid: int, timeout_s: float = 45.0
                         ) -> tuple[ChildWorker, dict[str, float]]:
    """The one child serving the group's figures, once they count `valid` events, and
    them; every other child serves /metrics and an empty /metrics/group."""
    wanted = {"acsr_events_total": valid, "acsr_events_invalid_total": 0,
              "acsr_events_duplicate_total": 0}
    deadline = time.monotonic() + timeout_s
    seen: object = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while time.monotonic() < deadline:
            own = [await _page(session, each, "/metrics") for each in workers]
            groups = [await _page(session, each, "/metrics/group") for each in workers]
            exporters = [each for each, text in zip(workers, groups, strict=True)
                         if text and text.strip()]
            seen = (len(exporters), [w.index for w in exporters])
            if None not in own and None not in groups and len(exporters) == 1:
                text = groups[workers.index(exporters[0])] or ""
                seen = metric_sums(text, COUNTS)
                if seen == wanted:
                    return exporters[0], seen
            await asyncio.sleep(0.3)
    raise AssertionError(f"the group's figures never were exactly once {wanted}: {seen}")


async def _new_pid(worker: ChildWorker, old: int, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pid = worker.pid()
        if pid is not None and pid != old:
            return pid
        await asyncio.sleep(0.2)
    raise AssertionError(f"process {worker.index} was not restarted; log:\n{worker.log_tail()}")


@pytest.mark.integration
async def test_two_processes_share_the_group_and_a_killed_one_is_restarted(
        kafka: BrokerInfo, tmp_path: Path) -> None:
    settings = run_settings(kafka, 4).with_overrides(data_dir=str(tmp_path / "data"))
    await create_topics(settings)
    lines = list(generate(60, seed=5, invalid_share=0, duplicate_share=0))
    first, second = lines[: len(lines) // 2], lines[len(lines) // 2:]
    cluster = SupervisedCluster(settings, 2, tmp_path / "logs")
    cluster.start()
    try:
        workers = [w for w in cluster.workers if isinstance(w, ChildWorker)]
        ends = await produce(settings.bootstrap_servers, settings.events_topic, first,
                             settings.tansu)
        await wait_processed(cluster, settings.bootstrap_servers, ends, lambda done: None, 60)
        exporter, _ = await _group_figures(workers, len(first))
        for worker in workers:  # each its own port (checked above) and data directory
            assert (tmp_path / "data" / f"process-{worker.index}").is_dir()
        pid = exporter.pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await _new_pid(exporter, pid)
        more = await produce(settings.bootstrap_servers, settings.events_topic, second,
                             settings.tansu)
        ends = {p: max(ends.get(p, 0), end) for p, end in more.items()}
        await wait_processed(cluster, settings.bootstrap_servers, ends, lambda done: None, 60)
        await _group_figures(workers, len(lines))
        children = [w.pid() for w in workers]
        assert None not in children
    finally:
        cluster.stop()
    assert cluster.supervisor is not None and cluster.supervisor.returncode == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in children)
    log = cluster.log_path.read_text(errors="replace")
    assert f"process {exporter.index} (pid {pid}, port {exporter.settings.web_port}) exited " \
        "unexpectedly, killed by SIGKILL" in log
