"""`tierkv serve` under load: streaming completions arriving as a Poisson process at several rates, and multi-turn
chat whose conversations re-send their history (with and without a CPU tier, same run).

Starts the real server (`python -m tierkv serve MODEL ...`, one process per configuration) and drives it over HTTP
with streaming requests: token-id prompts, greedy, exactly `--output-len` tokens each (ignore_eos). Per rate:
output tokens per second over the rate's wall time, time to first token (first streamed chunk), time per output
token ((last chunk - first chunk) / (tokens - 1)) and end-to-end latency, p50 and p99.

    python benchmarks/serve_load.py --model llama-3.1-8b --rates 2 4 8 16 --num-requests 200 --out load.json --plot load.png
    python benchmarks/serve_load.py --model llama-3.1-8b --chat --conversations 64 --turns 4 --rates 4 --think-time 4 \\
        --set gpu_memory=6GiB --compare cpu_memory=0GiB cpu_memory=40GiB --out chat.json

`--set KEY=VALUE` (repeatable) passes engine options to every server; `--compare A B ...` runs one server per
option (the chat comparison: each server's TTFT per turn).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time

import numpy as np


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


class Server:
    """`python -m tierkv serve` in a subprocess on a free port, up once /health answers."""

    def __init__(self, model: str, options: list[str], log_path: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "tierkv", "serve", model, "--port", str(self.port), "--served-model-name", "m"]
        for opt in options:
            args += ["--set", opt]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> None:
        import httpx2 as httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; its log: {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s; its log: {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def stream_one(client, url: str, prompt: list[int], max_tokens: int) -> dict:
    """One streaming completion: its send time, first and last chunk times, tokens and generated ids' text."""
    body = {
        "model": "m",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first = last = None
    tokens = cached = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            now = time.perf_counter()
            if chunk.get("choices"):
                first = first if first is not None else now
                last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {"sent": sent, "first": first, "last": last, "tokens": tokens, "prompt": len(prompt), "cached": cached}


def engine_counters(url: str) -> dict:
    """The server's prefix, preemption and link figures from /metrics (`name{labels}` -> value): where a workload's
    prompt tokens came from and what the load-or-recompute choice went by."""
    import httpx2 as httpx

    keep = ("tierkv_prefix", "tierkv_preemptions", "tierkv_link_bytes")
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(keep) and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def summarize(records: list[dict], wall: float) -> dict:
    ttft = [r["first"] - r["sent"] for r in records]
    tpot = [(r["last"] - r["first"]) / (r["tokens"] - 1) for r in records if r["tokens"] > 1]
    e2e = [r["last"] - r["sent"] for r in records]
    out = sum(r["tokens"] for r in records)
    return {
        "requests": len(records),
        "output_tokens": out,
        "wall_s": round(wall, 3),
        "output_tok_per_s": round(out / wall, 1),
        **{f"ttft_p{q}_ms": round(percentile(ttft, q) * 1e3, 1) for q in (50, 99)},
        **{f"tpot_p{q}_ms": round(percentile(tpot, q) * 1e3, 2) for q in (50, 99) if tpot},
        **{f"e2e_p{q}_s": round(percentile(e2e, q), 3) for q in (50, 99)},
        # prompt tokens whose KV was reused (prefix cache, any tier) over all prompt tokens
        "cached_share": round(sum(r["cached"] for r in records) / max(1, sum(r["prompt"] for r in records)), 3),
    }


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    low = 1000 if vocab > 2000 else 2  # clear of Llama-3's special ids (a tiny test model has few ids)
    return rng.integers(low, min(vocab, 128000), size=(n, length)).tolist()


async def poisson_run(url: str, prompts: list[list[int]], rate: float, max_tokens: int, seed: int) -> dict:
    """Send the prompts at exponential gaps of mean 1 / rate; all streamed at once as they arrive."""
    import httpx2 as httpx

    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        t0 = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(stream_one(client, url, p, max_tokens)))
            await asyncio.sleep(rng.expovariate(rate))
        records = await asyncio.gather(*tasks)
    return summarize(records, time.perf_counter() - t0)


async def chat_run(url: str, args, rate: float, vocab: int) -> dict:
    """Conversations arriving at `rate` per second; each sends its turns one after another, every turn the whole
    conversation so far (its earlier prompts and replies' ids) plus new tokens. TTFT per turn."""
    import httpx2 as httpx

    rng = random.Random(args.seed)
    new = [random_prompts(args.conversations, args.prompt_len, vocab, seed=100 + t) for t in range(args.turns)]
    per_turn: list[list[dict]] = [[] for _ in range(args.turns)]

    async def conversation(client, c: int) -> None:
        history: list[int] = []
        thinking = random.Random(args.seed * 1_000 + c)
        for t in range(args.turns):
            prompt = history + new[t][c]
            rec = await stream_one(client, url, prompt, args.output_len)
            per_turn[t].append(rec)
            # The reply's ids are not streamed back as ids: the next turn re-sends stand-in ids of the same length
            # (random, seeded per conversation and turn), which keeps the prefix up to the reply shared.
            reply = random_prompts(1, args.output_len, vocab, seed=10_000 * (t + 1) + c)[0]
            history = prompt + reply
            if args.think_time and t + 1 < args.turns:  # the user reads the reply: others' turns run meanwhile
                await asyncio.sleep(thinking.expovariate(1.0 / args.think_time))

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        t0 = time.perf_counter()
        tasks = []
        for c in range(args.conversations):
            tasks.append(asyncio.create_task(conversation(client, c)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    return {
        "whole": summarize([r for turn in per_turn for r in turn], wall),
        "turns": [summarize(turn, wall) for turn in per_turn],
    }


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for config in sorted({r["config"] for r in results}):
        rows = sorted((r for r in results if r["config"] == config), key=lambda r: r["rate"])
        rates = [r["rate"] for r in rows]
        for ax, key, label in (
            (axes[0], "output_tok_per_s", "output tok/s"),
            (axes[1], "ttft", "time to first token (ms)"),
            (axes[2], "tpot", "time per output token (ms)"),
        ):
            if key == "output_tok_per_s":
                ax.plot(rates, [r["summary"][key] for r in rows], marker="o", label=config or "server")
            else:
                for q, style in ((50, "-"), (99, "--")):
                    ax.plot(
                        rates,
                        [r["summary"].get(f"{key}_p{q}_ms") for r in rows],
                        style,
                        marker="o",
                        label=f"{config or 'server'} p{q}",
                    )
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--rates", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    ap.add_argument("--num-requests", type=int, default=100)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=128256, help="prompt ids are drawn below this (and below 128,000)")
    ap.add_argument("--chat", action="store_true", help="multi-turn conversations instead of single requests")
    ap.add_argument("--conversations", type=int, default=32)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument(
        "--think-time", type=float, default=0.0, help="mean seconds between a reply and the next turn (exponential)"
    )
    ap.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--compare", nargs="+", default=[""], metavar="KEY=VALUE", help="one server per option")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--log-dir", default=".")
    ap.add_argument("--out")
    ap.add_argument("--plot")
    args = ap.parse_args()
    results = []
    for i, config in enumerate(args.compare):
        options = args.options + ([config] if config else [])
        server = Server(args.model, options, os.path.join(args.log_dir, f"serve_load_server{i}.log"))
        try:
            server.wait_ready(args.start_timeout)
            for rate in args.rates:
                if args.chat:
                    res = asyncio.run(chat_run(server.url, args, rate, args.vocab))
                    summary, extra = res["whole"], {"turns": res["turns"]}
                else:
                    prompts = random_prompts(args.num_requests, args.prompt_len, args.vocab, seed=args.seed)
                    summary = asyncio.run(poisson_run(server.url, prompts, rate, args.output_len, args.seed))
                    extra = {}
                results.append({"config": config, "rate": rate, "summary": summary, **extra})
                line = ", ".join(f"{k} {v}" for k, v in summary.items())
                print(f"{config or 'server'} at {rate:g} req/s: {line}", flush=True)
                counters = engine_counters(server.url)  # (cumulative over the server's rates so far)
                results[-1]["engine_counters"] = counters
                print(f"  engine so far: {json.dumps({k: round(v, 1) for k, v in counters.items()})}", flush=True)
                for t, turn in enumerate(extra.get("turns", []), start=1):
                    print(
                        f"  turn {t}: TTFT p50 {turn['ttft_p50_ms']} ms, p99 {turn['ttft_p99_ms']} ms, prompt tokens "
                        f"cached {turn['cached_share']:.0%}",
                        flush=True,
                    )
        finally:
            server.stop()
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv), "options": args.options}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    if args.plot:
        plot(results, args.plot)
    if len(args.compare) > 1 and results:
        base = {r["rate"]: r["summary"]["ttft_p50_ms"] for r in results if r["config"] == args.compare[0]}
        for r in results:
            if r["config"] != args.compare[0] and base.get(r["rate"]):
                ratio = base[r["rate"]] / r["summary"]["ttft_p50_ms"]
                print(f"TTFT p50 at {r['rate']:g} req/s: {args.compare[0]} / {r['config']} = {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
