"""`tierkv run` with a `cluster:` section: records spread over replicas on a local Ray (2 replicas, tiny model, CPU).

The cluster runs' output must equal the single-process run's record for record (greedy), also after a replica is
killed mid-run, after the driver is killed and started again, and when a record crashes every replica it is on
(that one becomes an error line). The dispatcher's bookkeeping is checked apart, without Ray."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from cluster_crash_hook import CRASH_PROMPT
from hypothesis import given, settings
from hypothesis import strategies as st
from test_batch import PROMPTS, cli, lines_in, read_output, write_job
from tiny_models import make_checkpoint

from tierkv import ConfigError, TierKVError, batch
from tierkv.cluster.dispatch import Dispatcher

TESTS = str(Path(__file__).resolve().parent)
RECORDS = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(PROMPTS * 2)]  # 24 records
SAMPLING = {"max_tokens": 160}  # greedy (write_job's temperature 0), long enough to be killed mid-run
CLUSTER = {"backend": "ray", "replicas": 2, "records_in_flight": 2}


def cluster_job(folder, model_dir, records=RECORDS, **cluster):
    return write_job(folder, model_dir, records, sampling=SAMPLING, cluster={**CLUSTER, **cluster})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_checkpoint(path, "llama")
    return str(path)


@pytest.fixture(scope="module")
def straight(model_dir, tmp_path_factory):
    """The single-process run's lines, by id (one torch thread: two, beside the other tests' processes on two
    cores, spin against each other)."""
    job = write_job(tmp_path_factory.mktemp("straight"), model_dir, RECORDS, sampling=SAMPLING)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = batch.load_spec(job)
        batch.run(spec, progress=False)
    finally:
        torch.set_num_threads(threads)
    return {r["id"]: r for r in read_output(spec.output)}


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray in this process, used by the in-process runs (a process that joined Ray itself keeps its
    connection); its workers run tests/cluster_crash_hook.py's setup first."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": TESTS}, "worker_process_setup_hook": "cluster_crash_hook.setup"},
    )
    yield ray
    ray.shutdown()


def assert_same_as_straight(lines, straight, missing=()):
    ids = [r["id"] for r in lines]
    assert len(ids) == len(set(ids)), f"ids written twice: {sorted(i for i in ids if ids.count(i) > 1)}"
    assert sorted(ids) == sorted(set(straight) - set(missing))
    for r in lines:
        assert r == straight[r["id"]], f"record {r['id']} differs from the single-process run's"


# -- with Ray -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cluster_output_equals_the_single_process_run(model_dir, tmp_path, straight, ray_session, capsys):
    """Resuming the output of a single-process run that was killed (five lines and half of a sixth)."""
    from tierkv.cluster import driver

    spec = batch.load_spec(cluster_job(tmp_path / "job", model_dir))
    os.makedirs(os.path.dirname(spec.output))
    before = [json.dumps(straight[r["id"]], ensure_ascii=False) for r in RECORDS[:6]]
    Path(spec.output).write_text("\n".join(before[:5]) + "\n" + before[5][:40])
    summary = driver.run(spec)
    assert_same_as_straight(read_output(spec.output), straight)
    assert summary["already_done"] == 5 and summary["run"] == len(RECORDS) - 5
    assert summary["errors"] == 0 and summary["restarts"] == 0
    assert [r["replica"] for r in summary["replicas"]] == [0, 1]
    assert sum(r["records"] for r in summary["replicas"]) == summary["run"]
    assert all(r["records"] > 0 for r in summary["replicas"])  # both replicas worked
    assert summary["generated_tokens"] == SAMPLING["max_tokens"] * summary["run"]
    assert summary["stats"]["engine"]["generated_tokens"] == summary["generated_tokens"]
    bar = capsys.readouterr().err
    assert f"{len(RECORDS)}/{len(RECORDS)}" in bar and "tok/s, KV gpu" in bar and "2 replicas" in bar
    assert sorted(os.listdir(os.path.join(os.path.dirname(spec.path), "nvme"))) == ["replica-0", "replica-1"]
    assert driver.run(spec, progress=False)["run"] == 0  # nothing left to do


def replica_pids() -> set[int]:
    """Processes of Ray replicas (their title is ray::Replica...) that descend from this one."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            title = Path(f"/proc/{entry}/cmdline").read_bytes()
            if not title.startswith(b"ray::Replica"):
                continue
            pid = int(entry)
            while pid > 1 and pid != os.getpid():
                pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
            if pid == os.getpid():
                found.add(int(entry))
        except (OSError, ValueError):
            continue
    return found


def wait_for_lines(path, n, alive, timeout_s=240):
    deadline = time.monotonic() + timeout_s
    while lines_in(path) < n and alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lines_in(path) >= n, f"{lines_in(path)} lines written, waited for {n}"


@pytest.mark.slow
def test_a_replica_killed_mid_run_gives_every_id_once_with_the_same_texts(model_dir, tmp_path, straight, ray_session):
    from tierkv.cluster import driver

    spec = batch.load_spec(cluster_job(tmp_path / "job", model_dir))
    before = replica_pids()
    result = {}

    def run():
        try:
            result["summary"] = driver.run(spec, progress=False)
        except BaseException as exc:  # noqa: BLE001 (reported by the test's thread)
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    wait_for_lines(spec.output, 3, thread.is_alive)
    victims = sorted(replica_pids() - before)
    assert len(victims) == 2, victims
    os.kill(victims[0], signal.SIGKILL)
    assert lines_in(spec.output) < len(RECORDS), "the run finished before the kill"
    thread.join(timeout=300)
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert summary["restarts"] == 1 and summary["errors"] == 0, summary["replicas"]
    assert sum(r["deaths"] for r in summary["replicas"]) == 1
    assert_same_as_straight(read_output(spec.output), straight)


@pytest.mark.slow
def test_a_record_that_crashes_its_replica_is_an_error_line_and_the_rest_complete(
    model_dir, tmp_path, straight, ray_session
):
    from tierkv.cluster import driver

    records = RECORDS[:6] + [{"id": "boom", "prompt": CRASH_PROMPT}] + RECORDS[6:12]
    spec = batch.load_spec(cluster_job(tmp_path / "job", model_dir, records))
    summary = driver.run(spec, progress=False)
    lines = read_output(spec.output)
    (boom,) = [r for r in lines if r["id"] == "boom"]
    assert boom["outputs"] == [] and boom["text"] is None
    assert boom["error"].startswith("the replica running this record died twice with it")
    assert "exit" in boom["error"] or "died" in boom["error"]  # Ray's words for the death, named
    ours = {r["id"]: r for r in records}
    assert_same_as_straight([r for r in lines if r["id"] != "boom"], straight, missing=set(straight) - set(ours))
    assert summary["errors"] == 1 and summary["restarts"] >= 2
    # The error line counts as done: a rerun runs nothing.
    assert driver.run(spec, progress=False)["run"] == 0


@pytest.mark.slow
def test_a_replica_that_cannot_start_stops_the_run_with_its_error(model_dir, tmp_path, ray_session):
    from tierkv.cluster import driver

    spec = batch.load_spec(cluster_job(tmp_path / "job", model_dir, RECORDS[:2]))
    os.makedirs(os.path.join(spec.engine["nvme_dir"]))
    Path(spec.engine["nvme_dir"], "replica-1").write_text("in the way")
    with pytest.raises(TierKVError) as err:
        driver.run(spec, progress=False)
    assert str(err.value).startswith("replica 1 could not start: ")
    assert "replica-1' exists and is not a directory; give a directory path" in str(err.value)
    assert not os.path.exists(spec.output)  # nothing ran, nothing was written


@pytest.mark.slow
def test_the_driver_killed_mid_run_and_started_again_resumes(model_dir, tmp_path, straight):
    """Through the command line, with a local Ray that tierkv starts (and that dies with its driver)."""
    job = cluster_job(tmp_path / "job", model_dir)
    out = tmp_path / "job" / "out" / "results.jsonl"
    proc = cli(job, wait=False)
    wait_for_lines(out, 3, lambda: proc.poll() is None)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what the driver started and left behind (Ray's agents)
    except ProcessLookupError:
        pass
    written = lines_in(out)
    assert written < len(RECORDS), "the run finished before the kill"
    code, stdout, err = cli(job)
    assert code == 0, err
    assert f"records run ({written} were already done)" in stdout and "cluster: " in stdout
    assert_same_as_straight(read_output(out), straight)


# -- without Ray ----------------------------------------------------------------------------------------------------


def test_the_single_process_path_imports_no_ray(model_dir, tmp_path):
    job = write_job(tmp_path / "job", model_dir, RECORDS[:2], sampling={"max_tokens": 2})
    code = (
        "import sys, tierkv.batch, tierkv.cli, tierkv.cluster.replica\n"
        f"tierkv.cli.main(['run', {job!r}, '--no-progress'])\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(read_output(tmp_path / "job" / "out" / "results.jsonl")) == 2


@pytest.mark.parametrize(
    "cluster, engine, message",
    [
        ({"replica": 2}, {}, "cluster.replica: unknown key (did you mean 'replicas'?)"),
        ({"replicas": 0}, {}, "cluster: replicas must be an integer >= 1, got 0"),
        ({"replicas": "two"}, {}, "cluster.replicas: expected int, got 'two'"),
        ({"backend": "dask"}, {}, "cluster: backend 'dask' is not supported; the one backend is 'ray'"),
        ({"address": ""}, {}, "cluster: address '': give 'auto', a Ray cluster's address"),
        ({"cpus_per_replica": 0}, {}, "cluster: cpus_per_replica must be a number > 0"),
        ({"records_in_flight": 0}, {}, "cluster: records_in_flight must be an integer >= 1"),
        ({"gpus_per_replica": 0}, {}, "cluster: gpus_per_replica must be a number > 0"),
        (
            {"gpus_per_replica": 0.5},
            {"device": "cuda", "gpu_blocks": None},
            "cluster.gpus_per_replica 0.5: replicas sharing a GPU each need engine.gpu_memory",
        ),
        (
            {"gpus_per_replica": 0.5},
            {"device": "cuda", "tensor_parallel_size": 2, "gpu_memory": "4GiB"},
            "a fraction below 1 with tensor_parallel_size 1",
        ),
        ({}, {"device": None}, "engine.device: a cluster run needs it set to 'cuda' or 'cpu' (got None)"),
        ({}, {"device": "cuda:1"}, "engine.device: a cluster run needs it set to 'cuda' or 'cpu' (got 'cuda:1')"),
        ("ray", {}, "cluster: expected a mapping of ClusterConfig fields, got str"),
    ],
)
def test_cluster_section_errors_name_the_key_and_the_fix(model_dir, tmp_path, cluster, engine, message):
    job = write_job(tmp_path / "job", model_dir, RECORDS[:2], engine=engine, cluster=cluster)
    with pytest.raises(ConfigError) as err:
        batch.load_spec(job)
    assert message in str(err.value), str(err.value)
    assert not os.path.exists(tmp_path / "job" / "out")


def test_replicas_reserve_their_gpus_or_a_share_of_one():
    from tierkv.config import ClusterConfig

    assert ClusterConfig(replicas=2).gpus({"device": "cpu"}) == 0
    assert ClusterConfig(replicas=2).gpus({"device": "cuda", "tensor_parallel_size": 2}) == 2
    assert ClusterConfig(replicas=2, gpus_per_replica=0.5).gpus({"device": "cuda", "gpu_memory": "20GiB"}) == 0.5


def test_without_ray_installed_the_message_says_how_to_install_it(model_dir, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    job = write_job(tmp_path / "job", model_dir, RECORDS[:2], cluster={"replicas": 2})
    with pytest.raises(
        ConfigError, match=r"cluster: needs Ray, which is not installed here; pip install 'tierkv\[ray\]'"
    ):
        batch.load_spec(job)
    # The section is honoured from the command line too, and `--set cluster=null` runs in one process.
    job = write_job(tmp_path / "job2", model_dir, RECORDS[:2])
    spec = batch.load_spec(job, ["cluster=null"])
    assert spec.cluster is None
    with pytest.raises(ConfigError, match="pip install 'tierkv"):
        batch.load_spec(job, ["cluster.replicas=2"])


def test_cuda_replicas_checked_on_a_driver_without_cuda(model_dir, tmp_path, monkeypatch):
    """A cluster's head node may have no GPU: its records are prepared for the replicas' device."""
    job = write_job(tmp_path / "job", model_dir, RECORDS[:2], engine={"device": "cuda"}, cluster={"replicas": 2})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = batch.load_spec(job)
    on_cuda = batch.prepare(spec)
    spec.engine["device"] = "cpu"
    on_cpu = batch.prepare(spec)
    assert [p.token_ids for p in on_cuda] == [p.token_ids for p in on_cpu]
    assert on_cuda[0].fingerprint["settings"] != on_cpu[0].fingerprint["settings"]  # the device is in it
    with pytest.raises(ConfigError, match="tierkv.cluster.driver.run"):
        batch.run(spec)  # the single-process run refuses a cluster spec


def test_the_dispatcher_hands_out_in_order_and_probes_what_a_dead_replica_held():
    d = Dispatcher(list("abcdefgh"), records_in_flight=3, replicas=2)
    assert d.take(0) == ["a", "b", "c"] and d.take(1) == ["d", "e", "f"] and d.take(0) == []
    assert d.finished(0, ["a", "x"]) == ["a"] and d.take(0) == ["g"]
    assert d.died(1) == []  # d, e, f: run again as two probes, each alone on a replica
    assert d.take(1) == ["d"]  # (empty after its restart: the first probe)
    assert d.take(1) == []  # nothing beside a probe
    assert d.finished(1, ["d"]) == ["d"] and d.take(1) == ["e", "f"]
    assert d.died(1) == []  # e and f died together again: each alone now
    assert d.take(1) == ["e"] and d.finished(1, ["e"]) == ["e"]
    assert d.take(1) == ["f"] and d.died(1) == ["f"]  # alone, after an earlier death: given up
    assert d.finished(0, ["b", "c", "g"]) == ["b", "c", "g"] and d.take(0) == ["h"]
    assert d.finished(0, ["h"]) == ["h"] and d.done
    few = Dispatcher(list("abcde"), records_in_flight=64, replicas=2)  # a short run is spread over the replicas
    assert few.take(0) == ["a", "b", "c"] and few.take(1) == ["d"] and few.take(1) == ["e"] and few.take(0) == []


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 30),
    in_flight=st.integers(1, 6),
    replicas=st.integers(1, 3),
    poison=st.sets(st.integers(0, 29), max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_record_ends_exactly_once_and_only_crashing_ones_fail(n, in_flight, replicas, poison, seed):
    """Replicas answer at random; one holding a poisoned record dies on its next call. Every record is written
    once, finished or failed, and exactly the poisoned ones fail."""
    rng = random.Random(seed)
    poison = {k for k in poison if k < n}
    d = Dispatcher(list(range(n)), in_flight, replicas)
    written, failed = [], []
    held = {r: [] for r in range(replicas)}
    for _ in range(100_000):
        if d.done:
            break
        r = rng.randrange(replicas)
        held[r] += d.take(r)
        if poison & set(held[r]):
            failed += d.died(r)
            held[r] = []
        elif held[r]:
            answer = rng.sample(held[r], rng.randint(1, len(held[r])))
            written += d.finished(r, answer)
            held[r] = [k for k in held[r] if k not in answer]
    assert d.done
    assert sorted(written + failed) == list(range(n))
    assert set(failed) == poison


def test_records_go_out_by_priority_then_longest_first():
    from tierkv import SamplingParams
    from tierkv.cluster.driver import work_order

    def rec(priority, prompt_len, max_tokens):
        record = batch.Record(0, 1, "p", None, {}, priority=priority)
        return batch.PreparedRecord(record, [1] * prompt_len, SamplingParams(max_tokens=max_tokens), {})

    assert work_order([rec(0, 5, 5), rec(0, 50, 5), rec(1, 100, 100), rec(0, 5, 30)]) == [1, 3, 0, 2]


def test_a_cluster_yaml_runs_in_one_process_with_cluster_null(model_dir, tmp_path):
    job = write_job(tmp_path / "job", model_dir, RECORDS[:2], sampling={"max_tokens": 2}, cluster=dict(CLUSTER))
    code, _, err = cli(job, "--set", "cluster=null")
    assert code == 0, err
    assert sorted(r["id"] for r in read_output(tmp_path / "job" / "out" / "results.jsonl")) == ["r0", "r1"]
