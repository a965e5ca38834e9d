"""`tierkv bench` on the CPU with a tiny model: the table, the JSON and the PNG plots, and the HF baseline."""

import json

import pytest

from tierkv.cli import main


def test_bench_sweep_writes_table_json_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "--num-requests",
            "6",
            "--prompt-len",
            "20:60",
            "--output-len",
            "8",
            "--gpu-blocks",
            "4",
            "8",
            "--eviction",
            "lru",
            "clock",
            "--cpu-blocks",
            "8",
            "--repeats",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "TTFT ms p50/p90/p99" in table and "link ceilings (GB/s, measured now)" in table
    report = json.loads((out / "results.json").read_text())
    assert len(report["runs"]) == 4 and report["repeats"] == 2
    for run in report["runs"]:
        assert run["requests"] == 6 and run["output_tokens"] == 48
        assert run["ttft_s"]["p50"] > 0 and run["tpot_s"]["p99"] >= run["tpot_s"]["p50"]
        assert set(run["tiers"]) == {"gpu", "cpu", "nvme"}
        assert len(run["runs"]) == 2 and run["spread"][0] <= run["output_tokens_per_s"] <= run["spread"][1]
        assert f"{run['output_tokens_per_s']:.1f} [{run['spread'][0]:.1f}-{run['spread'][1]:.1f}]" in table
    small = [r for r in report["runs"] if r["config"]["gpu_blocks"] == 4]
    for r in small:  # the small GPU tier had to spill: the link was busy, and its rate is over that busy time
        link = r["links"]["gpu->cpu"]
        assert link["bytes"] > 0 and 0 < link["busy_share"] < 1 and link["gbps_while_busy"] > 0
        assert link["gbps_while_busy"] == pytest.approx(link["bytes"] / link["busy_s"] / 1e9)
    for name in ("throughput_vs_capacity.png", "hitrate_vs_capacity.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.parametrize("workload", ["shared-prefix", "long-context"])
def test_other_workloads(workload, tmp_path):
    out = tmp_path / "bench"
    assert (
        main(
            [
                "bench",
                "--workload",
                workload,
                "--num-requests",
                "3",
                "--prefix-len",
                "64",
                "--context-len",
                "300",
                "--output-len",
                "4",
                "--gpu-blocks",
                "6",
                "--cpu-blocks",
                "24",
                "--out",
                str(out),
                "--no-plots",
            ]
        )
        == 0
    )
    report = json.loads((out / "results.json").read_text())
    assert report["workload"]["kind"] == workload and report["runs"][0]["output_tokens"] > 0


def test_trace_replay_and_hf_baseline(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        "\n".join(
            json.dumps({"prompt_len": n, "output_len": 6, "arrival_s": 0.01 * i}) for i, n in enumerate([10, 40, 25])
        )
    )
    out = tmp_path / "bench"
    assert (
        main(
            [
                "bench",
                "--workload",
                "trace",
                "--trace",
                str(trace),
                "--gpu-blocks",
                "8",
                "--baseline",
                "hf",
                "--repeats",
                "1",
                "--out",
                str(out),
                "--no-plots",
            ]
        )
        == 0
    )
    report = json.loads((out / "results.json").read_text())
    assert report["runs"][0]["output_tokens"] == 18
    base = report["baseline"]
    assert base["hf generate (dynamic cache)"]["output_tokens_per_s"] > 0
    assert base["hf generate_batch"]["output_tokens_per_s"] > 0
    table = capsys.readouterr().out
    assert "best" not in table and "each tierkv run's median against its median: lru/16/gpu 8/cpu 16/nvme 256" in table


def test_bench_config_file_and_flags_win(tmp_path):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("num_requests: 2\noutput_len: '3'\ngpu_blocks: 6\neviction: [lru, clock]\nbaseline: none\n")
    out = tmp_path / "bench"
    assert main(["bench", "--config", str(cfg), "--eviction", "clock", "--out", str(out), "--no-plots"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert [r["config"]["eviction"] for r in report["runs"]] == ["clock"]
    assert report["workload"]["requests"] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_request: 2\n")
    assert main(["bench", "--config", str(bad), "--out", str(out)]) == 2


def test_without_an_nvme_tier(tmp_path):
    out = tmp_path / "bench"
    assert (
        main(
            [
                "bench",
                "--num-requests",
                "3",
                "--output-len",
                "4",
                "--gpu-blocks",
                "8",
                "--nvme-blocks",
                "0",
                "--out",
                str(out),
                "--no-plots",
            ]
        )
        == 0
    )
    report = json.loads((out / "results.json").read_text())
    assert set(report["runs"][0]["tiers"]) == {"gpu", "cpu"} and report["runs"][0]["config"]["nvme_blocks"] == 0
