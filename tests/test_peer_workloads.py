"""The workloads of the comparison with vLLM (benchmarks/peers), run through tierkv's side on a tiny model: the
requests each engine gets, multi-turn conversations that re-send their whole history (and so hit tierkv's prefix
cache from the second turn on), and the table of ratios."""

import dataclasses
import json
import os
import sys

from tiny_models import make_checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "peers"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import report  # noqa: E402
import tierkv_side  # noqa: E402
import workloads  # noqa: E402


def test_both_engines_get_the_same_requests():
    w = workloads.WORKLOADS["spill"]
    a, b = workloads.prompts(w.num, w.input_len, 0), workloads.prompts(w.num, w.input_len, 0)
    assert a == b and len(a) == 32 and all(len(p) == 8192 for p in a)
    lo, hi = workloads.TOKEN_RANGE
    assert all(lo <= t < hi for p in a for t in p)
    warm = workloads.warmup_prompts(w)  # never a prefix of a timed prompt: no cache hit from the warm-up
    assert not any(p[:64] == q[:64] for p in warm for q in a)


def test_chat_turns_resend_the_conversation_and_hit_the_prefix_cache(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "m", "llama")
    monkeypatch.setattr(workloads, "TOKEN_RANGE", (2, 370))  # the tiny model's vocabulary
    chat = dataclasses.replace(
        workloads.WORKLOADS["chat"], num=3, input_len=40, output_len=6, gpu_kv_gib=None, cpu_gib=None, turns=3
    )
    sent = []
    real = workloads._timed

    def spy(generate, prompts, max_tokens, label):
        sent.append([list(p) for p in prompts])
        return real(generate, prompts, max_tokens, label)

    monkeypatch.setattr(workloads, "_timed", spy)
    result = tierkv_side.run_one(chat, str(tmp_path / "m"))
    assert [r["label"] for r in result["passes"]] == ["turn 1", "turn 2", "turn 3"]
    for before, after in zip(sent, sent[1:]):  # each turn: the last turn's prompt, its reply, 40 new tokens
        assert all(len(b) == len(a) - 46 and a[: len(b)] == b for a, b in zip(after, before))
    assert result["counters"]["prefix"]["hit_tokens"] > 0
    assert result["total"]["output_tokens"] == 3 * 3 * 6

    # The table: vLLM's seconds over tierkv's, per workload and per turn.
    vllm = {**result, "engine": "vllm", "passes": [dict(p, elapsed_s=2 * p["elapsed_s"]) for p in result["passes"]]}
    vllm["total"] = workloads.summary(vllm["passes"])
    for name, r in (("tierkv_chat.json", result), ("vllm_chat.json", vllm)):
        (tmp_path / name).write_text(json.dumps(r))
    rows = report.rows(report.load(str(tmp_path)))
    assert [r["part"] for r in rows] == ["whole", "turn 1", "turn 2", "turn 3"]
    assert all(abs(r["ratio"] - 2.0) < 0.01 for r in rows)
