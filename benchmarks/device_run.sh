#!/usr/bin/env bash
# One call on the device machine: set up tierkv against the image's torch, run the whole test suite
# (GPU tests included), the block-move benchmark, the page-manager offload benchmark and the fused-kernel
# benchmark at an 8B shape, the decode-attention benchmark and an engine throughput run. Stages: all | tests | tests1 | tests2 | halves (tests1 and tests2 at once) | engine | bench | item3 | item4 | item4host
# (item3, item4: not in `all`; the layer-slice copy rates and a profile of item 3's streamed decode steps; profiles
# of item 4's oversubscribed steps with prefetch on and off).
# Usage (device tool, repo root, carrying .whl with the kvikio wheels):  bash benchmarks/device_run.sh [stage]
# The device machine's copy of .git can be older than its files: the JSON's `tree_matches_commit` then reads false.
# Prefix TIERKV_COMMIT=$(git rev-parse --short HEAD), as written out here, to record the commit that runs.
set -uo pipefail
out="${OUT:-/tmp/out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# The image's python3 is itself a venv holding torch: install tierkv (editable) straight into it.
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > "$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
export PYTHONPATH=/tmp/site
py=python3
tierkv_bin="$(dirname "$(command -v python3)")/tierkv"
{ nvidia-smi -L; $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$out/env.txt"
stage="${1:-all}"
# The whole suite took more than 540 s on a fresh H100 (2026-11-24, cold Triton cache): `tests1` and `tests2` run
# its two halves (files up to test_page_manager_stateful, the rest), one call each.
half1="tests/test_attention_kernels.py tests/test_batch.py tests/test_bench_cli.py tests/test_block_copy.py tests/test_engine.py \
tests/test_engine_gpu.py tests/test_fused_kernels.py tests/test_gpu.py tests/test_handles.py tests/test_nvme_store.py \
tests/test_packaged_model.py tests/test_page_manager.py tests/test_page_manager_stateful.py"
half2="$(ls tests/test_*.py | grep -v -F -x -f <(tr ' ' '\n' <<< "$half1" | grep .) | tr '\n' ' ')"
case "$stage" in
    all|tests) files=tests ;;
    tests1) files="$half1" ;;
    tests2) files="$half2" ;;
    *) files="" ;;
esac
if [ "$stage" = halves ]; then
    # Both halves at once, each in its own process (16 host cores; the GPU shared, every test sizes its own tiers):
    # the whole suite in one call. Verbose logs, so that a test still running at a timeout is named.
    timeout 520 $py -m pytest -v -p no:cacheprovider --durations=12 $half1 > "$out/pytest1.log" 2>&1 &
    timeout 520 $py -m pytest -v -p no:cacheprovider --durations=12 $half2 --deselect tests/test_tensor_parallel.py > "$out/pytest2.log" 2>&1 &
    wait
    for log in "$out/pytest1.log" "$out/pytest2.log"; do grep -E "FAILED|ERROR|passed|failed" "$log" | tail -8; done
fi
if [ -n "$files" ]; then
    # The CPU tensor-parallel tests (spawned gloo workers) run in CI; here they would only cost the call's time.
    timeout 540 $py -m pytest -q -p no:cacheprovider $files --deselect tests/test_tensor_parallel.py 2>&1 | tee "$out/pytest.log" | tail -25
fi
if [ "$stage" = all ] || [ "$stage" = engine ]; then
    timeout 400 $py benchmarks/attention_decode.py --sweep --out "$out/attention_decode.json" --record "$out/BENCHMARKS.attn.md" 2>&1 | tee "$out/attention_decode.log"
    timeout 300 $py benchmarks/engine_throughput.py --model llama-3.1-8b --num-requests 64 --prompt-len 512 --output-len 32 \
        --cpu-memory 4GiB --out "$out/engine_throughput.json" 2>&1 | tee "$out/engine_throughput.log"
fi
if [ "$stage" = all ] || [ "$stage" = bench ]; then
    timeout 150 $py benchmarks/block_moves.py --out "$out/block_moves.json" --record "$out/BENCHMARKS.rows.md" 2>&1 | tee "$out/block_moves.log"
    timeout 120 $py benchmarks/page_manager.py --device cuda --layout llama-3.1-8b --num-seqs 32 --prompt-min 256 --prompt-max 2048 \
        --gpu-blocks 256 --cpu-blocks 1024 --nvme-blocks 1024 --nvme-dir /tmp/nvme --json "$out/pm_bench.json" 2>&1 | tee "$out/pm_bench.log"
    timeout 180 $py benchmarks/fused_kernels.py --sweep --out "$out/fused_kernels.json" 2>&1 | tee "$out/fused_kernels.log"
fi
# Item 4's oversubscribed run, a window of its steps with prompt tokens (they set its pace, 2026-11-24).
item4_run="--num-requests 64 --prompt-len 1024 --output-len 64 --gpu-memory 1GiB --cpu-memory 8GiB --oversubscribe --start-step 20 --steps 8"
if [ "$stage" = item4 ]; then
    # Where those steps' time goes, host and GPU, prefetch on and off.
    for pf in "" --no-prefetch; do
        (cd benchmarks && timeout 200 $py overlap_profile.py $item4_run $pf --top 25 2>&1 | tee "$out/item4_profile${pf:+_off}.log" | grep -v "^  gap" | tail -40)
    done
fi
if [ "$stage" = item4host ]; then
    # The same steps' host side: step times, then cProfile.
    (cd benchmarks && timeout 200 $py overlap_profile.py $item4_run --top 45 --host-profile 2>&1 | tee "$out/item4_host.log" | tail -120)
fi
if [ "$stage" = item3 ]; then
    # Where item 3's step goes beyond its PCIe bound: one layer's slice of many blocks over the link (64 KiB pieces
    # at a 2 MiB pitch, as its stream moves them) against a contiguous copy, then a profile of its decode steps.
    timeout 150 $py benchmarks/layer_stream.py --out "$out/layer_stream.json" 2>&1 | tee "$out/layer_stream.log"
    (cd benchmarks && timeout 300 $py overlap_profile.py --num-requests 1 --prompt-len 262144 --output-len 16 --gpu-memory 8GiB \
        --cpu-memory 40GiB --max-model-len 270000 --start-step 40 --steps 3 --top 30 2>&1 | tee "$out/item3_profile.log" | grep -v "^  gap" | tail -45)
fi
