"""The table of the comparison with vLLM: every workload both engines ran, from the JSON that
benchmarks/peers/tierkv_side.py and vllm_side.py wrote into one folder.

    python benchmarks/peers/report.py /tmp/vs [--json table.json] [--bundle results.json]

ratio = vLLM's seconds / tierkv's seconds for the same requests: above 1.00x tierkv is faster.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys


def load(folder: str) -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        if "engine" in r and "workload" in r:
            variant = "" if r.get("prompts_apart", True) else " (paged prefill)"
            if r.get("max_batched_tokens", 16384) != 16384:
                variant += f" ({r['max_batched_tokens']} tokens a step)"
            out[(r["engine"] + variant, r["workload"])] = r
    return out


def rows(results: dict) -> list[dict]:
    table = []
    workloads = sorted({w for _, w in results}, key=["fits", "spill", "reread", "chat", "outgrow"].index)
    for w in workloads:
        v = results.get(("vllm", w))
        for engine in sorted(e for e, x in results if x == w and e.startswith("tierkv")):
            t = results[(engine, w)]
            parts = [("whole", v["total"] if v else None, t["total"])]
            if len(t["passes"]) > 1:
                vp = v["passes"] if v else [None] * len(t["passes"])
                parts += [(tp["label"], p, tp) for p, tp in zip(vp, t["passes"])]
            for label, vr, tr in parts:
                table.append(
                    {
                        "workload": w,
                        "engine": engine,
                        "part": label,
                        "vllm_s": vr["elapsed_s"] if vr else None,
                        "tierkv_s": tr["elapsed_s"],
                        "vllm_tok_s": vr["output_tok_per_s"] if vr else None,
                        "tierkv_tok_s": tr["output_tok_per_s"],
                        "ratio": round(vr["elapsed_s"] / tr["elapsed_s"], 3) if vr else None,
                    }
                )
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--json", help="write the table's rows here")
    ap.add_argument("--bundle", help="write every result read, whole, into this one file")
    args = ap.parse_args()
    results = load(args.folder)
    table = rows(results)
    print("| workload | part | vLLM s (tok/s) | tierkv s (tok/s) | vLLM s / tierkv s |")
    print("| --- | --- | --- | --- | --- |")
    for r in table:
        name = r["workload"] + ("" if r["engine"] == "tierkv" else r["engine"][len("tierkv") :])
        vllm = f"{r['vllm_s']:.2f} ({r['vllm_tok_s']:,.1f})" if r["vllm_s"] else "not run"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        print(f"| {name} | {r['part']} | {vllm} | {r['tierkv_s']:.2f} ({r['tierkv_tok_s']:,.1f}) | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)
    if args.bundle:
        with open(args.bundle, "w") as f:
            json.dump({f"{e}:{w}": r for (e, w), r in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
