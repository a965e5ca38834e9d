"""The `tierkv` command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from tierkv.errors import ConfigError, TierKVError


def _number(kind, low: float, what: str):
    """An argparse type: a finite `kind` (int or float) >= `low`, refused with a message naming the rule."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: must be {what}")
        return value

    return parse


POSITIVE = _number(int, 1, "an integer >= 1")
NON_NEGATIVE = _number(int, 0, "an integer >= 0")
RATE = _number(float, 0, "a finite number >= 0 (0: all requests at once)")


def _bench_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="offload benchmark: workloads through the engine, swept over policies, block sizes and capacities",
        description=(
            "Run a workload through tierkv for every combination of the swept options (lists), print a table, write "
            "results.json and PNG plots to --out, and with --baseline hf run the same requests through transformers "
            "in the same run. Defaults: a tiny Llama with random weights on the CPU, a few seconds."
        ),
    )
    p.add_argument(
        "--model", default="tiny-llama", help="checkpoint folder, packaged model or config (default: %(default)s)"
    )
    p.add_argument(
        "--load-format", default="auto", choices=["auto", "dummy"], help="dummy: random weights (configs imply it)"
    )
    p.add_argument("--device", help="cuda or cpu (default: cuda where available)")
    p.add_argument("--dtype", help="bfloat16, float16 or float32 (default: the model's on CUDA, float32 on CPU)")
    p.add_argument("--workload", default="synthetic", choices=["synthetic", "shared-prefix", "long-context", "trace"])
    p.add_argument("--num-requests", type=POSITIVE, default=16)
    p.add_argument("--prompt-len", default="32:128", help="N or LO:HI (the suffix length for shared-prefix)")
    p.add_argument("--output-len", default="16:32", help="N or LO:HI")
    p.add_argument("--prefix-len", type=NON_NEGATIVE, default=128, help="shared-prefix: the shared part")
    p.add_argument("--context-len", type=POSITIVE, default=2048, help="long-context: the prompt length")
    p.add_argument("--trace", help="trace: JSONL with prompt_len or prompt, output_len, and optional arrival_s")
    p.add_argument("--request-rate", type=RATE, default=0.0, help="requests per second (Poisson); 0: all at once")
    p.add_argument("--eviction", nargs="+", default=["lru"], choices=["lru", "clock"])
    p.add_argument("--block-size", nargs="+", type=POSITIVE, default=[16])
    p.add_argument("--gpu-blocks", nargs="+", type=POSITIVE, default=[8, 16, 32])
    p.add_argument("--cpu-blocks", nargs="+", type=NON_NEGATIVE, default=[16])
    p.add_argument("--nvme-blocks", nargs="+", type=NON_NEGATIVE, default=[256])
    p.add_argument("--nvme-dir", help="where NVMe tier files go (default: a temporary directory)")
    p.add_argument("--max-num-batched-tokens", type=POSITIVE, default=256)
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    p.add_argument(
        "--repeats",
        type=POSITIVE,
        default=3,
        help="runs of each config and baseline; the median and min-max are reported",
    )
    p.add_argument("--baseline", choices=["none", "hf"], default="none", help="hf: transformers on the same requests")
    p.add_argument("--out", default="bench-out", help="folder for results.json and the plots (default: %(default)s)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--config", help="a YAML file of these options (underscores for dashes); flags given too win")
    return p


def _bench_config(parser: argparse.ArgumentParser, path: str) -> None:
    """Make the options in a --config YAML the bench parser's defaults, so that flags on the command line win."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"--config {path!r}: no such file; give the path of a YAML file of tierkv bench options")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: not a valid YAML file ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of tierkv bench options")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    for key, value in data.items():
        if key not in actions:
            raise ConfigError(f"{path}: {key}: not a tierkv bench option; options: {', '.join(sorted(actions))}")
        action = actions[key]
        values = value if isinstance(value, list) else [value]
        if action.nargs != "+" and isinstance(value, list):
            raise ConfigError(f"{path}: {key}: expected one value, got a list")
        if action.type is not None:  # the same checks as on the command line
            try:
                values = [action.type(str(v)) for v in values]
            except argparse.ArgumentTypeError as exc:
                raise ConfigError(f"{path}: {key}: {exc}") from None
        if action.choices is not None and any(v not in action.choices for v in values):
            raise ConfigError(f"{path}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}")
        data[key] = values if action.nargs == "+" else values[0]
    parser.set_defaults(**data)


def _run_bench(args) -> int:
    from tierkv import bench_report, benchmark
    from tierkv.batch_output import first_existing

    if args.nvme_dir is not None and os.path.exists(args.nvme_dir) and not os.path.isdir(args.nvme_dir):
        raise ConfigError(f"--nvme-dir {args.nvme_dir!r} is a file; give a directory for the NVMe tier's block files")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out!r} is a file; give a directory for results.json and the plots")
    parent = first_existing(os.path.dirname(os.path.abspath(args.out)))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ConfigError(f"--out {args.out!r} cannot be created under {parent!r}; give a directory you can write")

    report = benchmark.main(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(bench_report.format_table(report))
    written = [os.path.join(args.out, "results.json")]
    if not args.no_plots:
        written += bench_report.plot(report, args.out)
    print("wrote " + ", ".join(written))
    return 0


def _run_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run a YAML batch job (resumable); without CONFIG, the demo",
        description=(
            "Run every record of the config's input JSONL that is not yet in its output JSONL, appending each result "
            "as it finishes. Killed and started again, it finishes the rest. Without CONFIG it runs the demo "
            "(configs/demo.yaml, shipped with tierkv) from scratch, prints the texts and writes out/demo.jsonl in the "
            "current directory."
        ),
    )
    p.add_argument("config", nargs="?", help="the run's YAML file (default: the demo)")
    p.add_argument("--check", action="store_true", help="only check the config and the input, load nothing")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set engine.eviction=clock (repeatable)",
    )
    p.add_argument("--fresh", action="store_true", help="discard the existing output and start over")
    p.add_argument("--show", action="store_true", help="print each result's text as it finishes")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_run(args) -> int:
    from tierkv import batch
    from tierkv.kv.stats import format_stats

    demo = args.config is None
    overrides = args.overrides
    if demo:
        # The demo's config is package data (inside site-packages once installed): its results and block files go
        # to out/ in the current directory instead of beside the YAML.
        # Paths the user gives with --set mean the current directory too.
        out = os.path.abspath("out")
        overrides = [f"output={out}/demo.jsonl", f"engine.nvme_dir={out}/demo-nvme", *batch.paths_from_here(overrides)]
    spec = batch.load_spec(args.config or batch.DEMO_CONFIG, overrides)
    fresh = args.fresh or demo
    if args.check:
        _, done = batch.check_run(spec, fresh)
        print(f"{spec.path}: ok, {len(spec.records)} records ({len(done)} already in {spec.output})")
        return 0
    run = batch.run
    if spec.cluster is not None:  # replicas on Ray; the single-process path imports no Ray
        from tierkv.cluster.driver import run
    try:
        summary = run(spec, fresh=fresh, show=args.show or demo, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(
            f"\ntierkv: interrupted; the records finished so far are in {spec.output}; run the same command again to "
            "finish the rest",
            file=sys.stderr,
        )
        return 130
    except TierKVError:
        raise
    except Exception as exc:  # a step failed (an I/O error, a bug): what happened, and that nothing done is lost
        print(
            f"tierkv: error: a step failed: {type(exc).__name__}: {exc}\ntierkv: the records finished so far are in "
            f"{spec.output}; fix the cause and run the same command again to finish the rest",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    if not summary["run"]:
        print(
            f"{spec.path}: all {summary['records']} records are already in {spec.output}; nothing to do (--fresh starts over)"
        )
        return 0
    print(format_stats(summary["stats"]))
    e = summary["stats"]["engine"]
    print(
        f"{summary['run']} records run ({summary['already_done']} were already done) in {summary['wall_s']:.1f} s "
        f"after {summary['load_s']:.1f} s of loading: {summary['generated_tokens']} tokens, "
        f"{summary['generated_tokens'] / max(1e-9, summary['wall_s']):.1f} tok/s, {e['steps']} steps, "
        f"{e['preemptions']} preemptions; results in {spec.output}"
    )
    if "replicas" in summary:
        per = ", ".join(f"{r['records']} on replica {r['replica']} ({r['node']})" for r in summary["replicas"])
        print(f"cluster: {per}; {summary['restarts']} restarts; {summary['errors']} records given up (error lines)")
    return 0


def _serve_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (completions, chat, streaming, metrics) over the tiered engine",
        description="Serve MODEL over OpenAI's HTTP API: /v1/completions, /v1/chat/completions, /v1/models, /health, "
        "/metrics. Engine options as in tierkv.LLM(...) or a run YAML's engine: mapping.",
    )
    p.add_argument("model", help="a checkpoint folder, a packaged model's name, or a model config (dummy weights)")
    p.add_argument("--config", help="a YAML file of engine options (its engine: mapping, or the whole file)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="an engine option")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=POSITIVE, default=8000)
    p.add_argument("--api-key", help="require Authorization: Bearer <key> on /v1 routes")
    p.add_argument("--served-model-name", help="the model name clients use (default: MODEL)")
    p.add_argument("--max-waiting", type=POSITIVE, default=1024, help="requests waiting beyond this get 503")
    p.add_argument("--drain-timeout", type=RATE, default=30.0, help="seconds running requests get to finish on SIGTERM")
    return p


def _run_serve(args) -> int:
    from tierkv.serve.server import engine_options, serve

    options = engine_options(args.config, args.overrides)
    serve(
        args.model,
        options,
        args.host,
        args.port,
        args.api_key,
        args.served_model_name,
        args.max_waiting,
        args.drain_timeout,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from tierkv import __version__

    parser = argparse.ArgumentParser(prog="tierkv", description="tierkv: a tiered KV-cache offloading runtime")
    parser.add_argument("--version", action="version", version=f"tierkv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    bench = _bench_parser(sub)
    _serve_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run_run(args)
        if args.command == "bench":
            if args.config:
                _bench_config(bench, args.config)
                args = parser.parse_args(argv)
            return _run_bench(args)
        if args.command == "serve":
            return _run_serve(args)
    except TierKVError as exc:
        print(f"tierkv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ntierkv: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
