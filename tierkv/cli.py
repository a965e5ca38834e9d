"""The `tierkv` command line."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from tierkv.errors import TierKVError


def _bench_parser(sub) -> None:
    from tierkv.bench import LAYOUT_PRESETS, BenchConfig

    p = sub.add_parser(
        "bench",
        help="offload benchmark of the page manager: a decode-like workload whose KV spills to CPU and NVMe",
        description=(
            "Runs sequences whose KV outgrows the GPU tier through the page manager, verifies every byte read "
            "back, and prints per-tier traffic. Defaults: SmolLM2-135M's KV shape on the CPU, a few seconds."
        ),
    )
    defaults = BenchConfig()
    for f in fields(BenchConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif f.name == "layout":
            p.add_argument(flag, choices=sorted(LAYOUT_PRESETS), default=default, help="KV shape of a model (default: %(default)s)")
        else:
            kind = int if isinstance(default, int) else str
            p.add_argument(flag, type=kind, default=default, help="(default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-' for stdout only)")


def _run_bench(args) -> int:
    from tierkv.bench import BenchConfig, run
    from tierkv.stats import format_stats

    cfg = BenchConfig(**{f.name: getattr(args, f.name) for f in fields(BenchConfig)})
    if args.json == "-":
        print(json.dumps(run(cfg), indent=2))
        return 0
    from tqdm import tqdm

    bar = tqdm(total=cfg.num_seqs, desc="sequences", unit="seq", leave=False)

    def progress(done: int, total: int) -> None:
        if done != bar.n:
            bar.update(done - bar.n)

    result = run(cfg, progress)
    bar.close()
    s = result["stats"]
    print(
        f"tierkv bench: {cfg.num_seqs} sequences of {cfg.prompt_min}-{cfg.prompt_max} prompt + {cfg.gen_tokens} tokens, "
        f"{cfg.layout} KV ({result['block_nbytes'] / 1024:.0f} KiB blocks of {cfg.block_size} tokens), device {cfg.device}, "
        f"eviction {cfg.eviction}, prefetch {'on' if cfg.prefetch else 'off'}"
    )
    print(format_stats(s))
    print(
        f"{result['steps']} steps, {result['decode_tokens']} decode tokens in {result['wall_s']:.2f} s "
        f"({result['decode_tokens_per_s']:.0f} tokens/s of page-manager work); "
        f"{result['verified_sequences']}/{cfg.num_seqs} sequences read back bit-exact"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _run_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run a YAML batch job (resumable); without CONFIG, the demo",
        description=(
            "Run every record of the config's input JSONL that is not yet in its output JSONL, appending each result "
            "as it finishes. Killed and started again, it finishes the rest. Without CONFIG it runs the demo "
            "(configs/demo.yaml) from scratch and prints the texts."
        ),
    )
    p.add_argument("config", nargs="?", help="the run's YAML file (default: the demo)")
    p.add_argument("--check", action="store_true", help="only check the config and the input, load nothing")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set engine.eviction=clock (repeatable)")
    p.add_argument("--fresh", action="store_true", help="discard the existing output and start over")
    p.add_argument("--show", action="store_true", help="print each result's text as it finishes")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_run(args) -> int:
    from tierkv import batch
    from tierkv.stats import format_stats

    demo = args.config is None
    spec = batch.load_spec(args.config or batch.DEMO_CONFIG, args.overrides)
    if args.check:
        done = batch.finished_ids(spec.output, {r.id for r in spec.records})
        batch.check_capacity(spec)
        print(f"{spec.path}: ok, {len(spec.records)} records ({len(done)} already in {spec.output})")
        return 0
    summary = batch.run(spec, fresh=args.fresh or demo, show=args.show or demo, progress=not args.no_progress)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    if not summary["run"]:
        print(f"{spec.path}: all {summary['records']} records are already in {spec.output}; nothing to do (--fresh starts over)")
        return 0
    print(format_stats(summary["stats"]))
    e = summary["stats"]["engine"]
    print(
        f"{summary['run']} records run ({summary['already_done']} were already done) in {summary['wall_s']:.1f} s "
        f"after {summary['load_s']:.1f} s of loading: {summary['generated_tokens']} tokens, "
        f"{summary['generated_tokens'] / max(1e-9, summary['wall_s']):.1f} tok/s, {e['steps']} steps, "
        f"{e['preemptions']} preemptions; results in {spec.output}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tierkv", description="tierkv: a tiered KV-cache offloading runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    _bench_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run_run(args)
        if args.command == "bench":
            return _run_bench(args)
    except TierKVError as exc:
        print(f"tierkv: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
