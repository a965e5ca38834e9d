#!/usr/bin/env bash
# A/B in one call: the outgrowing workload of fast_path.sh item 4 (prefetch on) with the swap as built (host copies
# kept from promotion, large blocks down through the copy engines) and without them (both directions on the SMs,
# every block copied down), interleaved. (When this was measured, 2026-11-24, the swap as built also went in four
# chunks; it goes in one since decode graphs wait for arriving blocks layer by layer: Placement.swap_chunks.)
set -uo pipefail
out="${OUT:-/tmp/out}"
py="${PYTHON:-python3}"
args="${AB_ARGS:---model llama-3.1-8b --num-requests 32 --prompt-len 256 --output-len 512 --gpu-memory 1GiB --cpu-memory 8GiB}"
for round in 1 2; do
    for mode in new old; do
        $py - $args --out "$out/ab_${mode}_$round.json" <<PY 2>&1 | grep -E "tok/s" | sed "s/^/$mode: /"
import runpy, sys
sys.argv = ["benchmarks/engine_throughput.py"] + sys.argv[1:]
sys.path.insert(0, "benchmarks")
if "$mode" == "old":
    import tierkv.kv.mover, tierkv.kv.placement
    tierkv.kv.placement.Placement.swap_chunks = 1
    tierkv.kv.placement.Placement.keep_host_copies = False
    tierkv.kv.mover.Mover.d2h_engine_block_bytes = 1 << 62
runpy.run_path("benchmarks/engine_throughput.py", run_name="__main__")
PY
    done
done
