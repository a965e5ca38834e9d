"""benchmarks/serve_load.py against a live `tierkv serve` on a tiny model: Poisson arrivals at two rates, then a
multi-turn chat compared across two server configurations; every request gets its tokens and the summary adds up."""

import json
import os
import subprocess
import sys

from tiny_models import make_checkpoint

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "serve_load.py")


def run(tmp_path, *extra):
    out = tmp_path / "load.json"
    cmd = [sys.executable, SCRIPT, "--model", str(tmp_path / "m"), "--vocab", "370", "--prompt-len", "12"]
    cmd += ["--output-len", "5", "--set", "block_size=4", "--set", "gpu_blocks=24", "--log-dir", str(tmp_path)]
    cmd += ["--start-timeout", "120", "--out", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text()), done.stdout


def test_poisson_rates_and_chat_comparison(tmp_path):
    make_checkpoint(tmp_path / "m", "llama")
    data, _ = run(tmp_path, "--rates", "20", "50", "--num-requests", "12", "--plot", str(tmp_path / "load.png"))
    assert [r["rate"] for r in data["results"]] == [20, 50]
    for r in data["results"]:
        s = r["summary"]
        assert s["requests"] == 12 and s["output_tokens"] == 12 * 5
        assert 0 < s["ttft_p50_ms"] <= s["ttft_p99_ms"] and 0 < s["tpot_p50_ms"] <= s["tpot_p99_ms"]
    assert (tmp_path / "load.png").stat().st_size > 0
    data, stdout = run(
        tmp_path,
        "--chat",
        "--conversations",
        "4",
        "--turns",
        "3",
        "--rates",
        "10",
        "--compare",
        "cpu_blocks=0",
        "cpu_blocks=64",
    )
    assert [r["config"] for r in data["results"]] == ["cpu_blocks=0", "cpu_blocks=64"]
    for r in data["results"]:
        assert r["summary"]["requests"] == 4 * 3 and [t["requests"] for t in r["turns"]] == [4, 4, 4]
    assert "TTFT p50 at 10 req/s: cpu_blocks=0 / cpu_blocks=64" in stdout
