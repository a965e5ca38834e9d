"""The report of `tierkv bench`: the printed table and the PNG plots of throughput and GPU hit rate against tier
capacity, both drawn from the report dict tierkv.benchmark.main returns."""

from __future__ import annotations

import os


def format_table(report: dict) -> str:
    def ms(x):
        return "-" if x is None else f"{1e3 * x:.1f}"

    lines = [
        f"workload {report['workload']['kind']}: {report['workload']['requests']} requests, "
        f"{report['workload']['prompt_tokens']} prompt + {report['workload']['output_tokens']} output tokens, "
        f"{report['workload']['model']} on {report['workload']['device']}",
        "link ceilings (GB/s, measured now): "
        + ", ".join(f"{k} {v:.2f}" for k, v in report["link_ceilings_gbps"].items()),
        f"{'eviction':>8} {'bs':>3} {'gpu':>5} {'cpu':>5} {'nvme':>5} | {'req/s':>7} {'out tok/s':>9} | "
        f"{'TTFT ms p50/p90/p99':>20} | {'TPOT ms p50/p90/p99':>20} | {'hit% gpu/cpu/nvme':>17} | link GB/s (util.)",
    ]
    for r in report["runs"]:
        c = r["config"]
        hits = "/".join("-" if t["hit_rate"] is None else f"{100 * t['hit_rate']:.0f}" for t in r["tiers"].values())
        links = ", ".join(
            f"{k} {v['gbps']:.2f}" + (f" ({100 * v['utilisation']:.0f}%)" if v["utilisation"] is not None else "")
            for k, v in r["links"].items()
            if v["bytes"]
        )
        ttft = "/".join(ms(r["ttft_s"][p]) for p in ("p50", "p90", "p99"))
        tpot = "/".join(ms(r["tpot_s"][p]) for p in ("p50", "p90", "p99"))
        lines.append(
            f"{c['eviction']:>8} {c['block_size']:>3} {c['gpu_blocks']:>5} {c['cpu_blocks']:>5} {c['nvme_blocks']:>5} | "
            f"{r['requests_per_s']:>7.2f} {r['output_tokens_per_s']:>9.1f} | {ttft:>20} | {tpot:>20} | {hits:>17} | {links or '-'}"
        )
        for name, ph in r.get("phases", {}).items():
            pre = ph["prefix"]
            rate = "-" if pre["hit_rate"] is None else f"{100 * pre['hit_rate']:.0f}%"
            served = ", ".join(f"{k} {v}" for k, v in pre["hit_tokens_by_tier"].items() if v)
            lines.append(
                f"{'':>31} {name:>9}: TTFT p50 {ms(ph['ttft_s']['p50'])} ms, {ph['output_tokens_per_s']:.1f} out tok/s, "
                f"prefix hit rate {rate} ({served or 'no hits'}; recomputed by choice {pre['recomputed_by_choice']})"
            )
    if report["baseline"]:
        best = max(r["output_tokens_per_s"] for r in report["runs"])
        for name, b in report["baseline"].items():
            if "error" in b:
                lines.append(f"baseline {name}: not run ({b['error']})")
            else:
                lines.append(
                    f"baseline {name}: {b['output_tokens_per_s']:.1f} out tok/s; tierkv's best run is {best / b['output_tokens_per_s']:.2f}x"
                )
    return "\n".join(lines)


def plot(report: dict, folder: str) -> list[str]:
    """PNG plots of output tokens/s and GPU hit rate against the swept tier capacity, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    axis = next(
        (k for k in ("gpu_blocks", "cpu_blocks", "nvme_blocks") if len({r["config"][k] for r in runs}) > 1),
        "gpu_blocks",
    )
    paths = []
    for metric, label, fname in (
        (lambda r: r["output_tokens_per_s"], "output tokens/s", "throughput_vs_capacity.png"),
        (lambda r: 100 * (r["tiers"]["gpu"]["hit_rate"] or 0), "GPU tier hit rate (%)", "hitrate_vs_capacity.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        groups: dict[tuple, list] = {}
        for r in runs:
            c = r["config"]
            groups.setdefault((c["eviction"], c["block_size"]), []).append((c[axis], metric(r)))
        for (eviction, bs), pts in sorted(groups.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{eviction}, block {bs}")
        ax.set_xlabel(f"{axis.replace('_', ' ')}")
        ax.set_ylabel(label)
        ax.set_title(f"{report['workload']['kind']}: {label} vs {axis.split('_')[0]} tier capacity", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(folder, fname)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
