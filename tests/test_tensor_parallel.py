"""Tensor parallelism on CPU: 2 processes over gloo, float32. Output equals transformers' generate() and the
single-process engine token for token, with KV through all three tiers on every rank; a worker that dies or
hangs ends the run with an error naming its rank; a YAML batch run killed that way resumes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tiny_models import hf_greedy, make_checkpoint, random_prompts

import tierkv
from tierkv import ConfigError, WorkerError
from tierkv.model import ModelSpec
from tierkv.tp.group import SAFE_ENV, Shards, TPContext

MAX_TOKENS = 12


def tiers(tmp_path, name):
    # Tiny GPU and CPU tiers: long prompts stream from the CPU tier, everything else spills to NVMe.
    return dict(
        device="cpu",
        block_size=4,
        gpu_blocks=6,
        cpu_blocks=40,
        nvme_dir=str(tmp_path / name),
        nvme_blocks=160,
        max_num_batched_tokens=48,
        prefix_load="always",
    )


def gloo_threads():
    """This process's threads that belong to a gloo process group (named by torch: pt_gloo_runloop, gloo_tcp_loop)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(n for n in names if "gloo" in n)


def workload(vocab):
    """Two rounds: the second one's prompts start with a prefix the first one left in the cache (by then
    demoted down the tiers), so prefix hits are attached and read back on every rank."""
    shared = random_prompts(1, 40, 40, vocab, seed=12)[0]
    first = random_prompts(8, 5, 120, vocab, seed=11) + [shared + [5, 6, 7]]
    second = [shared + p for p in random_prompts(3, 9, 9, vocab, seed=13)]
    return first, second


@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("llama", {"vocab_size": None}),  # 2 KV heads: split, one per rank; vocabulary padded to split evenly
        ("qwen2", {"num_key_value_heads": 1}),  # GQA with 1 KV head: replicated on both ranks; tied embeddings
    ],
)
def test_tp2_equals_transformers_and_tp1_through_three_tiers(tmp_path, arch, overrides):
    overrides = {k: v for k, v in overrides.items() if v is not None}
    path = tmp_path / arch
    hf = make_checkpoint(path, arch, **overrides)
    vocab = hf.config.vocab_size
    if arch == "llama":
        assert vocab % 2, "the test wants a vocabulary that does not split evenly"
    rounds = workload(vocab)
    prompts = rounds[0] + rounds[1]
    params = tierkv.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)

    def run(**kwargs):
        with tierkv.LLM(str(path), **kwargs) as llm:
            out = [o.outputs[0].token_ids for r in rounds for o in llm.generate(r, params, use_tqdm=False)]
            return out, llm.stats()

    got, stats = run(tensor_parallel_size=2, **tiers(tmp_path, "tp2"))
    assert not gloo_threads(), f"close() left the process group's threads running: {gloo_threads()}"
    single, _ = run(**tiers(tmp_path, "tp1"))
    for i, prompt in enumerate(prompts):
        want = hf_greedy(hf, prompt, MAX_TOKENS)
        assert got[i] == want, f"prompt {i} ({len(prompt)} tokens): TP=2 {got[i]} != transformers {want}"
        assert single[i] == want, f"prompt {i}: TP=1 {single[i]} != transformers {want}"
    tp = stats["tensor_parallel"]
    assert tp["size"] == 2 and len(tp["per_rank"]) == 2
    for rank in tp["per_rank"]:
        # Every rank moved its own bytes through every tier, and the same blocks as rank 0.
        for name in ("gpu", "cpu", "nvme"):
            assert rank["tiers"][name]["blocks_in"] > 0, f"no traffic into {name} on a rank"
            assert rank["tiers"][name]["blocks_in"] == tp["per_rank"][0]["tiers"][name]["blocks_in"]
    half = tp["per_rank"][0]["block_nbytes"]
    assert tp["total"]["tiers"]["nvme"]["bytes_in"] == 2 * tp["per_rank"][0]["tiers"]["nvme"]["bytes_in"]
    assert tp["total"]["tiers"]["cpu"]["capacity_bytes"] == 2 * 40 * half
    assert stats["engine"]["streamed_steps"] > 0 and stats["prefix"]["hit_tokens"] > 0
    assert sorted(os.listdir(tmp_path / "tp2")) == ["rank-0", "rank-1"]


def test_shards_split_heads_mlp_and_vocabulary():
    spec = ModelSpec(
        architecture="LlamaForCausalLM",
        vocab_size=301,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=8,
        num_kv_heads=2,
        head_dim=8,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
        qk_norm=False,
        sliding_windows=(0, 0),
        max_position_embeddings=2048,
    )
    got = [Shards.for_rank(spec, TPContext(r, 4)) for r in range(4)]
    assert [s.heads for s in got] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [s.kv_heads for s in got] == [(0, 1), (0, 1), (1, 2), (1, 2)]  # 2 KV heads over 4 ranks: replicated
    assert [s.intermediate for s in got] == [(0, 32), (32, 64), (64, 96), (96, 128)]
    assert [s.vocab for s in got] == [(0, 76), (76, 152), (152, 228), (228, 304)] and got[0].vocab_padded == 304
    assert got[1].slice_of("model.layers.0.self_attn.o_proj.weight", 8) == (1, 16, 32)
    assert got[1].slice_of("model.layers.0.input_layernorm.weight", 8) is None
    with pytest.raises(ConfigError, match="does not divide the attention heads"):
        Shards.for_rank(spec, TPContext(0, 3))


def test_bad_tensor_parallel_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="tensor_parallel_size must be a positive integer"):
        tierkv.LLM("tiny-llama", load_format="dummy", tensor_parallel_size=0)
    with pytest.raises(ConfigError, match="tp_timeout_s"):
        tierkv.LLM("tiny-llama", load_format="dummy", tensor_parallel_size=2, tp_timeout_s=-1)


def _kill_worker_then_step(tmp_path, sig):
    path = tmp_path / "llama"
    make_checkpoint(path, "llama")
    prompts = random_prompts(4, 30, 60, 300, seed=3)
    llm = tierkv.LLM(str(path), tensor_parallel_size=2, tp_timeout_s=8, **tiers(tmp_path, "kv"))
    try:
        llm.add_requests(prompts, tierkv.SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
        for _ in range(3):
            llm.step()
        worker = llm._driver.workers.procs[0]
        with open(f"/proc/{worker.pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        for key, value in SAFE_ENV.items():  # NVLink multicast stays off in every process tierkv starts
            assert env.get(key.encode()) == value.encode(), f"worker environment lacks {key}={value}"
        os.kill(worker.pid, sig)
        t0 = time.monotonic()
        with pytest.raises(WorkerError) as err:
            for _ in range(100):
                llm.step()
        return str(err.value), time.monotonic() - t0
    finally:
        llm._driver.workers.kill()  # a stopped worker, if the error path left it
        llm.close()


def test_a_killed_worker_ends_the_run_with_an_error_naming_its_rank(tmp_path):
    message, waited = _kill_worker_then_step(tmp_path, signal.SIGKILL)
    assert "rank 1" in message and "exit" in message, message
    # gloo usually notices the closed connection at once; where it does not, the collective's timeout ends it.
    assert waited < 8 + 10, f"the error took {waited:.1f} s"


def test_a_hung_worker_ends_the_run_after_the_timeout_naming_its_rank(tmp_path):
    message, waited = _kill_worker_then_step(tmp_path, signal.SIGSTOP)
    assert "did not answer within tp_timeout_s=8" in message and "rank 1" in message, message
    assert waited < 40, f"the error took {waited:.1f} s"


def test_yaml_batch_run_with_tp2_survives_a_killed_worker_and_resumes(tmp_path):
    from test_batch import PROMPTS, cli, lines_in, read_output, write_job

    model = tmp_path / "llama"
    make_checkpoint(model, "llama")
    tp = {"tensor_parallel_size": 2, "max_num_seqs": 2}
    straight = write_job(tmp_path / "straight", str(model), engine={"max_num_seqs": 2})
    assert cli(straight)[0] == 0
    want = {r["id"]: r for r in read_output(tmp_path / "straight" / "out" / "results.jsonl")}

    job = write_job(tmp_path / "job", str(model), engine=tp)
    out = tmp_path / "job" / "out" / "results.jsonl"
    proc = cli(job, wait=False)
    deadline = time.time() + 180
    while lines_in(out) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    workers = _spawned_children(proc.pid)
    assert len(workers) == 1, f"expected one worker process, found {workers}"
    os.kill(workers[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "rank 1" in err, err[-2000:]
    done = lines_in(out)
    assert 0 < done < len(PROMPTS), f"{done} records out before the kill"
    code, _, err = cli(job)
    assert code == 0, err[-2000:]
    got = read_output(out)
    assert sorted(r["id"] for r in got) == sorted(want)
    for r in got:
        assert r == want[r["id"]], f"record {r['id']} differs from the uninterrupted single-process run"


def _spawned_children(pid):
    """Worker processes (multiprocessing spawn children, not its resource tracker) of process `pid`."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in f.read().split():
                with open(f"/proc/{child}/cmdline", "rb") as c:
                    cmd = c.read().replace(b"\0", b" ")
                if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
                    found.append(int(child))
    return found


TORCHRUN_SCRIPT = """
import json, os, sys
import tierkv
model, out, nvme = sys.argv[1:4]
prompts = json.loads(sys.argv[4])
llm = tierkv.LLM(model, device="cpu", tensor_parallel_size=2, block_size=4, gpu_blocks=6, cpu_blocks=40, nvme_dir=nvme, nvme_blocks=160)
# Ranks other than 0 served rank 0 inside LLM(...) and exited there: only rank 0 runs what follows.
params = tierkv.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
stats = llm.stats()
llm.close()
# `llm` stays referenced to the end, as in a user's script: close() alone must have ended the process group's
# threads (left running into the interpreter's teardown, they aborted the process now and then).
threads = []
for t in os.listdir("/proc/self/task"):
    try:
        threads.append(open(f"/proc/self/task/{t}/comm").read().strip())
    except OSError:  # the thread ended meanwhile (as gloo_threads() above allows: close() joins the I/O threads)
        pass
with open(out, "w") as f:
    json.dump({"outputs": outputs, "ranks": stats["tensor_parallel"]["size"], "gloo_threads": [n for n in threads if "gloo" in n]}, f)
""".replace("MAX_TOKENS", str(MAX_TOKENS))


def test_the_same_code_runs_under_torchrun(tmp_path):
    path = tmp_path / "llama"
    hf = make_checkpoint(path, "llama")
    prompts = random_prompts(4, 10, 90, hf.config.vocab_size, seed=5)
    script = tmp_path / "job.py"
    script.write_text(TORCHRUN_SCRIPT)
    out = tmp_path / "out.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
        str(path),
        str(out),
        str(tmp_path / "nvme"),
        json.dumps(prompts),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["ranks"] == 2
    assert got["gloo_threads"] == [], (
        f"after close() rank 0 still ran the process group's threads {got['gloo_threads']}"
    )
    for prompt, tokens in zip(prompts, got["outputs"]):
        assert tokens == hf_greedy(hf, prompt, MAX_TOKENS)
