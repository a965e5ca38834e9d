"""Careless and hostile use: nothing is lost, nothing wrong is reported as done, the engine survives its errors,
and bad input is refused before anything runs with a message naming the value and the fix. (Each test is one of
the seven ways this went wrong before; see the issue "Nothing lost, nothing poisoned".)"""

import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from kv_tools import check_invariants
from test_batch import PROMPTS, cli, lines_in, read_output, write_job
from tiny_models import make_checkpoint, random_prompts

import tierkv
from tierkv import CapacityError, ConfigError, SamplingParams, StoreError
from tierkv.batch_output import OutputFile
from tierkv.kv.nvme_store import RECORD_NBYTES, NvmeStore

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_checkpoint(path, "llama")
    return str(path)


def small_llm(model_dir, nvme_dir, **kw):
    opts = dict(device="cpu", block_size=4, gpu_blocks=8, cpu_blocks=16, nvme_dir=str(nvme_dir), nvme_blocks=64)
    return tierkv.LLM(model_dir, **{**opts, **kw})


# -- 1. data loss ---------------------------------------------------------------------------------------------------


def test_fresh_beside_a_running_run_deletes_nothing(model_dir, tmp_path):
    job = write_job(tmp_path / "job", model_dir)
    assert cli(job)[0] == 0
    out = tmp_path / "job" / "out" / "results.jsonl"
    before = out.read_bytes()
    holder = OutputFile(str(out))  # what a run in progress holds
    try:
        code, _, err = cli(job, "--fresh")
        assert code == 2 and "being written by another tierkv run" in err, err
        code, _, err = cli(job, "--check")
        assert code == 2 and "being written by another tierkv run" in err, err
    finally:
        holder.close()
    assert out.read_bytes() == before


def test_fresh_with_a_config_that_fails_its_checks_keeps_the_old_results(model_dir, tmp_path):
    job = write_job(tmp_path / "job", model_dir)
    assert cli(job)[0] == 0
    out = tmp_path / "job" / "out" / "results.jsonl"
    before = out.read_bytes()
    code, _, err = cli(
        job,
        "--fresh",
        "--set",
        "engine.cpu_blocks=0",
        "--set",
        "engine.nvme_blocks=2",
        "--set",
        "sampling.max_tokens=200",
    )
    assert code == 2 and "KV blocks but all tiers together hold" in err, err
    assert out.read_bytes() == before


@pytest.mark.parametrize("fresh", [False, True])
def test_an_output_that_is_the_input_is_refused(model_dir, tmp_path, fresh):
    job = write_job(tmp_path / "job", model_dir, output="in.jsonl")
    before = (tmp_path / "job" / "in.jsonl").read_bytes()
    code, _, err = cli(job, *(["--fresh"] if fresh else []))
    assert code == 2 and "is the same file as the input" in err, err
    assert (tmp_path / "job" / "in.jsonl").read_bytes() == before
    job = write_job(tmp_path / "job2", model_dir, output="nvme/results.jsonl")
    code, _, err = cli(job)
    assert code == 2 and "lies inside nvme_dir" in err, err


# -- 2. wrong results reported as done --------------------------------------------------------------------------


def test_a_resume_refuses_results_of_another_input_or_other_settings(model_dir, tmp_path):
    job = write_job(tmp_path / "job", model_dir, sampling={"max_tokens": 4})
    assert cli(job)[0] == 0
    code, _, err = cli(job, "--set", "sampling.max_tokens=5")
    assert code == 2 and "id 'r0' was written under other settings" in err and "--fresh" in err, err
    other = [{"id": f"r{i}", "prompt": p + " again"} for i, p in enumerate(PROMPTS)]
    write_job(tmp_path / "job", model_dir, other, sampling={"max_tokens": 4})
    code, _, err = cli(job)
    assert code == 2 and "id 'r0' was written for a different input record" in err, err
    code, out, err = cli(job, "--fresh")
    assert code == 0, err
    assert len(read_output(tmp_path / "job" / "out" / "results.jsonl")) == len(PROMPTS)


# -- 3. duplicates ----------------------------------------------------------------------------------------------


def test_two_runs_on_one_output_never_write_an_id_twice(model_dir, tmp_path):
    job = write_job(tmp_path / "job", model_dir, engine={"nvme_dir": None, "nvme_blocks": None, "cpu_blocks": 64})
    procs = [cli(job, wait=False) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    ids = [r["id"] for r in read_output(tmp_path / "job" / "out" / "results.jsonl")]
    assert sorted(ids) == sorted(f"r{i}" for i in range(len(PROMPTS))), ids
    codes = sorted(code for _, _, code in results)
    assert codes in ([0, 0], [0, 2]), results
    if codes == [0, 2]:
        assert any("being written by another tierkv run" in err for _, err, _ in results)


# -- 4. a poisoned engine -----------------------------------------------------------------------------------------


def test_ctrl_c_inside_generate_leaves_the_engine_usable(model_dir, tmp_path, monkeypatch):
    prompts = random_prompts(6, 10, 40, 370, seed=1)
    with small_llm(model_dir, tmp_path / "ref") as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    with small_llm(model_dir, tmp_path / "nvme") as llm:
        real, calls = llm.engine.runner.run_forward, []

        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) == 5:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(llm.engine.runner, "run_forward", interrupted)
        with pytest.raises(KeyboardInterrupt) as exc:
            llm.generate(prompts, GREEDY, use_tqdm=False)
        assert exc.value.aborted_request_ids
        check_invariants(llm.pm)
        assert not llm.pm.sequences and not llm.engine.live
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == want


def test_a_disk_filled_mid_run_fails_one_call_and_the_next_works(model_dir, tmp_path):
    prompts = random_prompts(8, 30, 60, 370, seed=2)
    with small_llm(model_dir, tmp_path / "ref") as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    with small_llm(model_dir, tmp_path / "nvme") as llm:
        backend = llm.pm.tiers[2].store._backend
        write = backend.write

        def full(runs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        backend.write = full
        with pytest.raises(StoreError, match="blocks.bin failed: the disk is full"):
            llm.generate(prompts, GREEDY, use_tqdm=False)
        backend.write = write
        check_invariants(llm.pm)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == want


def test_logprobs_beyond_the_vocabulary_are_refused_before_anything_runs(model_dir, tmp_path):
    with small_llm(model_dir, tmp_path / "nvme") as llm:
        with pytest.raises(ConfigError, match="logprobs=1000 is more than the model's vocabulary of 375"):
            llm.generate([[5, 6, 7]], SamplingParams(logprobs=1000), use_tqdm=False)
        assert llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    job = write_job(tmp_path / "job", model_dir, sampling={"logprobs": 1000})
    code, _, err = cli(job, "--check")
    assert code == 2 and "input line 1 (id 'r0'): logprobs=1000" in err, err


def test_ctrl_c_during_a_batch_run_stops_cleanly_and_resumes(model_dir, tmp_path):
    straight = write_job(tmp_path / "straight", model_dir)
    assert cli(straight)[0] == 0
    want = {r["id"]: r["outputs"] for r in read_output(tmp_path / "straight" / "out" / "results.jsonl")}
    job = write_job(tmp_path / "job", model_dir)
    out = tmp_path / "job" / "out" / "results.jsonl"
    proc = cli(job, wait=False)
    deadline = time.time() + 120
    while lines_in(out) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert lines_in(out) < len(PROMPTS)
    code, _, err = cli(job)
    assert code == 0, err
    got = read_output(out)
    assert sorted(r["id"] for r in got) == sorted(want) and all(r["outputs"] == want[r["id"]] for r in got)


# -- 5. accepted nonsense ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(temperature=float("nan")), "temperature=nan: must be a finite number"),
        (dict(temperature=True), "temperature=True"),
        (dict(top_p=float("inf")), "top_p=inf"),
        (dict(stop=5), "stop=5"),
    ],
)
def test_sampling_nonsense_is_refused(kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        SamplingParams(**kw)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([5, 2.7, 8], "token 1 is 2.7 (float)"),
        ([5, "7"], "token 1 is '7' (str)"),
        ([True, 5], "token 0 is True (bool)"),
        (np.array([1.0, 2.0]), "dtype float64"),
        (torch.tensor(5), "prompts: got a 0-D Tensor"),
        (torch.tensor([[1, 2], [3, 4]], dtype=torch.float32), "prompt 0: a Tensor of dtype torch.float32"),
        (None, "prompts: got NoneType"),
        (5, "prompts: got int"),
        (["a", None], "prompt 1: got None"),
    ],
)
def test_prompt_nonsense_is_refused(model_dir, tmp_path, prompt, message):
    with small_llm(model_dir, tmp_path / "nvme") as llm:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            llm.generate(prompt, GREEDY, use_tqdm=False)
        assert not llm.engine.live


def test_token_arrays_and_tensors_are_prompts_like_lists(model_dir, tmp_path):
    ids = [5, 9, 30, 7, 100]
    with small_llm(model_dir, tmp_path / "nvme") as llm:
        outs = llm.generate([ids, np.array(ids, dtype=np.int32), torch.tensor(ids)], GREEDY, use_tqdm=False)
        single = llm.generate(torch.tensor(ids), GREEDY, use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in outs + single}) == 1


@pytest.mark.parametrize("value", ["nan", "inf", float("nan"), -1])
def test_tier_sizes_that_are_not_sizes_are_refused(model_dir, value):
    with pytest.raises(ConfigError, match="cpu_memory"):
        tierkv.LLM(model_dir, device="cpu", gpu_blocks=8, cpu_memory=value)


def test_max_model_len_too_small_is_caught_by_check_naming_the_input_line(model_dir, tmp_path):
    job = write_job(tmp_path / "job", model_dir, engine={"max_model_len": 20})
    code, _, err = cli(job, "--check")
    assert code == 2 and "input line 1 (id 'r0')" in err and "exceeds max_model_len 20" in err, err


def test_request_ids_must_be_unique_and_queued_requests_are_never_lost(model_dir, tmp_path):
    with small_llm(model_dir, tmp_path / "nvme") as llm:
        with pytest.raises(ConfigError, match="'a' appears twice"):
            llm.add_requests([[5, 6], [7, 8]], GREEDY, request_ids=["a", "a"])
        llm.add_requests([[5, 6, 7]], GREEDY, request_ids=["a"])
        with pytest.raises(ConfigError, match="'a' is already in use"):
            llm.add_requests([[9, 9]], GREEDY, request_ids=["a"])
        llm.generate([[11, 12, 13]], SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)  # finishes "a" too
        got = llm.step()
        assert [o.request_id for o in got] == ["a"] and got[0].finished
        assert llm.step() == [] and not llm.has_unfinished()


# -- 6. tracebacks instead of messages -------------------------------------------------------------------------


def test_bad_input_files_and_output_paths_get_messages(model_dir, tmp_path):
    job = write_job(tmp_path / "job", model_dir)
    (tmp_path / "job" / "in.jsonl").write_bytes(b'{"id": 1, "prompt": "caf\xe9"}\n')
    code, _, err = cli(job, "--check")
    assert code == 2 and "in.jsonl:1: not UTF-8" in err, err
    job = write_job(tmp_path / "job", model_dir, [{"id": 1, "messages": []}])
    code, _, err = cli(job, "--check")
    assert code == 2 and "non-empty list" in err, err
    for output, message in (
        ("out", "is a directory"),
        ("in.jsonl/x.jsonl", "is a file, not a directory"),
        ("/proc/sys/results.jsonl", "not writable"),
    ):
        (tmp_path / "job" / "out").mkdir(exist_ok=True)
        job = write_job(tmp_path / "job", model_dir, output=output)
        code, _, err = cli(job, "--check")
        assert code == 2 and message in err, (output, err)


@pytest.mark.parametrize("victim", ["blocks.bin", "slots.tok"])
def test_store_files_replaced_by_directories_get_a_message(model_dir, tmp_path, victim):
    nvme = tmp_path / "nvme"
    with small_llm(model_dir, nvme) as llm:
        llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    os.remove(nvme / victim)
    os.mkdir(nvme / victim)
    with pytest.raises(StoreError, match=f"{victim} is not a regular file; nvme_dir must hold only tierkv's own files"):
        small_llm(model_dir, nvme)


def test_an_immutable_store_file_gets_a_message(model_dir, tmp_path):
    nvme = tmp_path / "nvme"
    with small_llm(model_dir, nvme) as llm:
        llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    target = nvme / "slots.idx"
    if subprocess.run(["chattr", "+i", str(target)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not possible on this machine (needs root on ext4/xfs)")
    try:
        with pytest.raises(StoreError, match=r"cannot open .*slots\.idx \(Operation not permitted\)"):
            small_llm(model_dir, nvme)
    finally:
        subprocess.run(["chattr", "-i", str(target)], check=True)


def test_generate_after_close_says_so(model_dir, tmp_path):
    llm = small_llm(model_dir, tmp_path / "nvme")
    llm.close()
    with pytest.raises(ConfigError, match="this LLM is closed"):
        llm.generate([[5, 6]], GREEDY, use_tqdm=False)


def test_bench_arguments_and_config_errors_get_messages(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_requests: [1, 2\n")
    notes = tmp_path / "file"
    notes.write_text("x")
    for args, message in (
        (["--config", str(tmp_path / "missing.yaml")], "no such file"),
        (["--config", str(bad)], "not a valid YAML file"),
        (["--nvme-dir", str(notes)], "is a file; give a directory"),
        (["--out", str(notes / "sub")], "cannot be created under"),
        (["--request-rate", "nan"], "must be a finite number"),
        (["--num-requests", "0"], "must be an integer >= 1"),
        (["--prefix-len", "-5"], "must be an integer >= 0"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "tierkv", "bench", *args], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    (tmp_path / "rate.yaml").write_text("request_rate: -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "tierkv", "bench", "--config", str(tmp_path / "rate.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "request_rate" in proc.stderr and "must be a finite number" in proc.stderr, (
        proc.stderr
    )


# -- 7. misleading --------------------------------------------------------------------------------------------


def test_a_full_disk_names_the_file_that_failed_and_the_store_reserves_its_files(tmp_path, monkeypatch):
    layout = tierkv.KVLayout(2, 2, 8, torch.float32, 4)
    with NvmeStore(str(tmp_path / "nvme"), layout, 16) as store:
        for name in ("blocks.bin", "slots.idx", "slots.tok"):
            st = os.stat(tmp_path / "nvme" / name)
            assert st.st_blocks * 512 >= st.st_size, f"{name} is sparse: a later write could find the disk full"
        pool = torch.randn((2, *layout.block_shape))
        tok_fd, pwrite = store._tok_fd, os.pwrite

        def full_tokens(fd, data, offset):
            if fd == tok_fd:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", full_tokens)
        with pytest.raises(StoreError, match=r"write to .*slots\.tok failed: the disk is full"):
            store.write([0], pool, [0], [b"k" * 32], [(1, 2, 3, 4)])


def test_host_memory_tiers_are_checked_together_against_the_ram(model_dir):
    from tierkv.kv.tiers import _available_ram

    avail = _available_ram()
    half = int(avail * 0.6)
    with pytest.raises(CapacityError, match="the tiers in host memory need cpu tier .* gpu tier .* together"):
        tierkv.LLM(model_dir, device="cpu", gpu_memory=half, cpu_memory=half)


def test_a_stored_block_whose_key_and_tokens_were_swapped_fails_its_checksum(tmp_path):
    layout = tierkv.KVLayout(2, 2, 8, torch.float32, 4)
    pool = torch.randn((2, *layout.block_shape))
    keys, tokens = [b"A" * 32, b"B" * 32], [(1, 2, 3, 4), (5, 6, 7, 8)]
    with NvmeStore(str(tmp_path / "nvme"), layout, 4) as store:
        store.write([0, 1], pool, [0, 1], keys, tokens)
        tok_nbytes = store._tok_nbytes
    idx, tok = tmp_path / "nvme" / "slots.idx", tmp_path / "nvme" / "slots.tok"
    records, toks = bytearray(idx.read_bytes()), bytearray(tok.read_bytes())
    a, b = slice(32, 64), slice(RECORD_NBYTES + 32, RECORD_NBYTES + 64)  # the key field of records 0 and 1
    records[a], records[b] = records[b], records[a]
    toks[:tok_nbytes], toks[tok_nbytes : 2 * tok_nbytes] = toks[tok_nbytes : 2 * tok_nbytes], toks[:tok_nbytes]
    idx.write_bytes(bytes(records))
    tok.write_bytes(bytes(toks))
    with NvmeStore(str(tmp_path / "nvme"), layout, 4) as store:
        entries = {key: slot for slot, key, _ in store.keyed_entries()}
        assert entries[b"B" * 32] == 0  # the index now says slot 0 holds B's prefix...
        out = torch.empty_like(pool)
        with pytest.raises(tierkv.CorruptBlockError):  # ...but slot 0's bytes are A's: refused, never served as B
            store.read([0], out, [0])
