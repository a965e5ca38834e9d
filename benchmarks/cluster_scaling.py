"""A YAML batch run on Ray replicas against one replica, same machine, same call: throughput and exactly-once.

    # issue 30 on a machine with 2 GPUs: 2,000 records of 1,024 + 128 tokens, 1 replica on 1 GPU, then 2 on 2 GPUs,
    # then 2 again with one replica's process killed once 30% of the records are done
    python benchmarks/cluster_scaling.py --records 2000 --replicas 1 2 --kill-at 0.3 --out scaling.json
    # the set-up on one GPU: 2 replicas sharing it (each its own 20 GiB GPU tier), smaller
    python benchmarks/cluster_scaling.py --records 200 --replicas 1 2 --gpus-per-replica 0.5 --gpu-memory 20GiB

Each configuration is `tierkv run job.yaml --fresh --json` in a process of its own (a local Ray that tierkv starts
and stops), the records random token ids written as words of a word-level tokenizer made here (a dummy-weight model
has none), greedy with ignore_eos: every record generates exactly --output-len tokens. Reported per run: the
replicas' load time, the run's wall time after loading and its output tokens per second, the ratio to the first
configuration, and whether every id is in the output exactly once; with --kill-at, the replica deaths Ray saw.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from common import run_meta, write_json


def word_tokenizer(folder: str, vocab: int) -> None:
    """A tokenizer whose words "w0" ... are the ids 0 ...: a record of n words is n tokens (no special tokens)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(folder)


def write_records(path: str, n: int, length: int, vocab: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    low = 1000 if vocab > 2000 else 2  # clear of special ids
    with open(path, "w") as f:
        for i, ids in enumerate(rng.integers(low, vocab, size=(n, length))):
            f.write(json.dumps({"id": f"r{i}", "prompt": " ".join(f"w{t}" for t in ids)}) + "\n")


def write_job(folder: str, args, replicas: int, tokenizer: str, records: str) -> str:
    import yaml

    engine = {
        "device": args.device,
        "load_format": "dummy",
        "tokenizer": tokenizer,
        "max_num_batched_tokens": args.max_num_batched_tokens,
    }
    if args.gpu_memory:
        engine["gpu_memory"] = args.gpu_memory
    cluster = {"replicas": replicas, "cpus_per_replica": args.cpus_per_replica}
    if args.gpus_per_replica is not None:
        cluster["gpus_per_replica"] = args.gpus_per_replica
    job = {
        "model": args.model,
        "engine": engine,
        "sampling": {"max_tokens": args.output_len, "temperature": 0, "ignore_eos": True},
        "input": records,
        "output": os.path.join(folder, "out.jsonl"),
        "cluster": cluster,
    }
    path = os.path.join(folder, "job.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(job, f)
    return path


def replica_pids() -> list[int]:
    """Processes of Ray actors running a replica ("ray::Replica" in their command line)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"ray::Replica" in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return sorted(pids)


def kill_one_later(output: str, lines: int, killed: list) -> threading.Thread:
    """Once `output` holds `lines` results (the run is under way, its replicas loaded), SIGKILL one replica's process,
    noting its pid in `killed`."""

    def kill() -> None:
        while True:
            try:
                with open(output, "rb") as f:
                    if sum(1 for _ in f) >= lines:
                        break
            except FileNotFoundError:
                pass
            time.sleep(0.05)
        for pid in replica_pids():
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            except ProcessLookupError:
                continue

    t = threading.Thread(target=kill, daemon=True)
    t.start()
    return t


def run_one(job: str, ids: list[str], kill_at: float | None) -> dict:
    killed: list[int] = []
    if kill_at:
        kill_one_later(os.path.join(os.path.dirname(job), "out.jsonl"), max(1, int(kill_at * len(ids))), killed)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "tierkv", "run", job, "--fresh", "--json", "--no-progress"],
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"tierkv run {job} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    seen: dict[str, int] = {}
    tokens = 0
    with open(os.path.join(os.path.dirname(job), "out.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            seen[str(r["id"])] = seen.get(str(r["id"]), 0) + 1
            tokens += sum(len(o["token_ids"]) for o in r.get("outputs", []))
    once = sorted(seen) == sorted(ids) and all(c == 1 for c in seen.values())
    return {
        "elapsed_s": elapsed,
        "load_s": summary["load_s"],
        "wall_s": summary["wall_s"],
        "output_tokens": tokens,
        "output_tok_per_s": tokens / summary["wall_s"],
        "every_id_once": once,
        "missing": len(set(ids) - set(seen)),
        "repeated": sum(1 for c in seen.values() if c > 1),
        "killed_pids": killed,
        "restarts": summary.get("restarts"),
        "errors": summary.get("errors"),
        "replicas": summary.get("replicas"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="configurations, run in this order")
    ap.add_argument("--gpus-per-replica", type=float, help="a fraction: replicas share a GPU (needs --gpu-memory)")
    ap.add_argument("--gpu-memory", help="each replica's GPU tier, e.g. 20GiB")
    ap.add_argument("--cpus-per-replica", type=float, default=4)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument(
        "--kill-at", type=float, help="then run the last configuration again, killing a replica once this share is done"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    from tierkv.loader import load_hf_config, resolve_config_path

    vocab = load_hf_config(resolve_config_path(args.model)).vocab_size
    work = tempfile.mkdtemp(prefix="tierkv-scaling-")
    tokenizer = os.path.join(work, "tokenizer")
    word_tokenizer(tokenizer, vocab)
    records = os.path.join(work, "records.jsonl")
    write_records(records, args.records, args.prompt_len, vocab, args.seed)
    ids = [f"r{i}" for i in range(args.records)]
    runs = [(k, None) for k in args.replicas] + ([(args.replicas[-1], args.kill_at)] if args.kill_at else [])
    results = []
    for replicas, kill_at in runs:
        folder = os.path.join(work, f"run{len(results)}")
        os.makedirs(folder)
        r = run_one(write_job(folder, args, replicas, tokenizer, records), ids, kill_at)
        r.update(replicas=replicas, kill_at=kill_at, replica_stats=r.pop("replicas"))
        results.append(r)
        base = results[0]["output_tok_per_s"]
        print(
            f"{replicas} replica(s){f', one killed with {kill_at:.0%} done' if kill_at else ''}: load "
            f"{r['load_s']:.1f} s, run {r['wall_s']:.1f} s, {r['output_tok_per_s']:.1f} output tok/s "
            f"({r['output_tok_per_s'] / base:.2f}x the first), every id once: {r['every_id_once']} "
            f"(missing {r['missing']}, repeated {r['repeated']}); killed {r['killed_pids'] or 'none'}, "
            f"restarts {r['restarts']}",
            flush=True,
        )
    write_json(args.out, run_meta(), args=vars(args), results=results)
    return 0 if all(r["every_id_once"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
