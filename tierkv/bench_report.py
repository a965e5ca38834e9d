"""The report of `tierkv bench`: repeated runs summed up with their spread, the printed table and the PNG plots of
throughput and GPU hit rate against tier capacity, drawn from the report dict tierkv.benchmark.main returns."""

from __future__ import annotations

import os


def with_spread(runs: list[dict], key: str = "output_tokens_per_s") -> dict:
    """One result for repeated runs of the same thing: the median run by `key` (the lower middle one of an even
    count) whole, with every run's headline figures and the min-max of `key` (so a reader sees the run-to-run
    spread, not one lucky run)."""
    ordered = sorted(runs, key=lambda r: r[key])
    result = dict(ordered[(len(ordered) - 1) // 2])
    result["runs"] = [{k: r[k] for k in ("wall_s", key) if k in r} for r in runs]
    result["spread"] = [ordered[0][key], ordered[-1][key]]
    return result


def _range(r: dict, fmt: str = "{:.1f}") -> str:
    """ "median [min-max]" of a result with repeats, else its figure."""
    mid = fmt.format(r["output_tokens_per_s"])
    lo, hi = r.get("spread", (None, None))
    return mid if lo is None or len(r.get("runs", ())) < 2 else f"{mid} [{fmt.format(lo)}-{fmt.format(hi)}]"


def _label(c: dict) -> str:
    return f"{c['eviction']}/{c['block_size']}/gpu {c['gpu_blocks']}/cpu {c['cpu_blocks']}/nvme {c['nvme_blocks']}"


def format_table(report: dict) -> str:
    def ms(x):
        return "-" if x is None else f"{1e3 * x:.1f}"

    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    repeats = report.get("repeats", 1)
    lines = [
        f"workload {report['workload']['kind']}: {report['workload']['requests']} requests, "
        f"{report['workload']['prompt_tokens']} prompt + {report['workload']['output_tokens']} output tokens, "
        f"{report['workload']['model']} on {report['workload']['device']}; each run {repeats} time(s): the median "
        "run's figures, output tok/s as median [min-max]",
        "link ceilings (GB/s, measured now): "
        + ", ".join(f"{k} {v:.2f}" for k, v in report["link_ceilings_gbps"].items()),
        f"{'eviction':>8} {'bs':>3} {'gpu':>5} {'cpu':>5} {'nvme':>5} | {'req/s':>7} {'out tok/s':>21} | "
        f"{'TTFT ms p50/p90/p99':>20} | {'TPOT ms p50/p90/p99':>20} | {'hit% gpu/cpu/nvme':>17} | "
        "link: GB/s while copying (busy share of the run, of the link's ceiling)",
    ]
    for r in report["runs"]:
        c = r["config"]
        hits = "/".join("-" if t["hit_rate"] is None else f"{100 * t['hit_rate']:.0f}" for t in r["tiers"].values())
        links = ", ".join(
            f"{k} {v['gbps_while_busy']:.2f} ({pct(v['busy_share'])}, {pct(v['of_ceiling'])})"
            for k, v in r["links"].items()
            if v["bytes"] and v["gbps_while_busy"] is not None
        )
        ttft = "/".join(ms(r["ttft_s"][p]) for p in ("p50", "p90", "p99"))
        tpot = "/".join(ms(r["tpot_s"][p]) for p in ("p50", "p90", "p99"))
        lines.append(
            f"{c['eviction']:>8} {c['block_size']:>3} {c['gpu_blocks']:>5} {c['cpu_blocks']:>5} {c['nvme_blocks']:>5} | "
            f"{r['requests_per_s']:>7.2f} {_range(r):>21} | {ttft:>20} | {tpot:>20} | {hits:>17} | {links or '-'}"
        )
        for name, ph in r.get("phases", {}).items():
            pre = ph["prefix"]
            rate = "-" if pre["hit_rate"] is None else f"{100 * pre['hit_rate']:.0f}%"
            served = ", ".join(f"{k} {v}" for k, v in pre["hit_tokens_by_tier"].items() if v)
            lines.append(
                f"{'':>31} {name:>9}: TTFT p50 {ms(ph['ttft_s']['p50'])} ms, {_range(ph)} out tok/s, "
                f"prefix hit rate {rate} ({served or 'no hits'}; recomputed by choice {pre['recomputed_by_choice']})"
            )
    for name, b in (report["baseline"] or {}).items():
        if "error" in b:
            lines.append(f"baseline {name}: not run ({b['error']})")
            continue
        ratios = "; ".join(
            f"{_label(r['config'])} {r['output_tokens_per_s'] / b['output_tokens_per_s']:.2f}x" for r in report["runs"]
        )
        lines.append(f"baseline {name}: {_range(b)} out tok/s; each tierkv run's median against its median: {ratios}")
    return "\n".join(lines)


def plot(report: dict, folder: str) -> list[str]:
    """PNG plots of output tokens/s (min-max bars over the repeats, the baselines as dashed lines) and GPU hit rate
    against the swept tier capacity, one line per policy and block size (markers and dashes differ, so that lines
    that coincide stay visible)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    axis = next(
        (k for k in ("gpu_blocks", "cpu_blocks", "nvme_blocks") if len({r["config"][k] for r in runs}) > 1),
        "gpu_blocks",
    )
    styles = [("o", "-", 9), ("s", "--", 7), ("^", ":", 6), ("D", "-.", 5), ("v", "-", 4), ("P", "--", 4)]
    paths = []
    for metric, spread, label, fname in (
        (
            lambda r: r["output_tokens_per_s"],
            lambda r: r.get("spread"),
            "output tokens/s",
            "throughput_vs_capacity.png",
        ),
        (
            lambda r: 100 * (r["tiers"]["gpu"]["hit_rate"] or 0),
            lambda r: None,
            "GPU tier hit rate (%)",
            "hitrate_vs_capacity.png",
        ),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        groups: dict[tuple, list] = {}
        for r in runs:
            c = r["config"]
            groups.setdefault((c["eviction"], c["block_size"]), []).append((c[axis], metric(r), spread(r)))
        for i, ((eviction, bs), pts) in enumerate(sorted(groups.items())):
            pts.sort(key=lambda p: p[0])
            marker, dash, size = styles[i % len(styles)]
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            bars = [[y - (s[0] if s else y) for _, y, s in pts], [(s[1] if s else y) - y for _, y, s in pts]]
            ax.errorbar(
                xs,
                ys,
                yerr=bars,
                marker=marker,
                linestyle=dash,
                markersize=size,
                capsize=3,
                fillstyle="none",
                label=f"{eviction}, block {bs}",
            )
        if fname.startswith("throughput"):
            for j, (name, b) in enumerate((report.get("baseline") or {}).items()):
                if "error" not in b:
                    ax.axhline(b["output_tokens_per_s"], color=f"C{7 + j % 3}", linestyle=(0, (4, 2)), label=name)
        ax.set_xlabel(f"{axis.replace('_', ' ')}")
        ax.set_ylabel(label)
        ax.set_title(f"{report['workload']['kind']}: {label} vs {axis.split('_')[0]} tier capacity", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(folder, fname)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
