#!/usr/bin/env bash
# tierkv against vLLM on the same GPU, the same workloads (benchmarks/peers/workloads.py), one engine at a time.
# On the device machine, in the repository root; results gather in /tmp/vs (kept while the machine stays warm)
# and come back in $OUT after every stage, bundled in one JSON, with the table so far (benchmarks/peers/report.py).
#   bash benchmarks/vs_vllm.sh chunk N            copy .peers/cN (carried) to /tmp/vch; after c4, install vLLM
#   bash benchmarks/vs_vllm.sh tierkv W...        tierkv's side (installs tierkv first; carry .whl)
#   bash benchmarks/vs_vllm.sh tierkv-paged W...  the same with whole prompts through the paged prefill kernel
#   (tierkv options after the workloads pass through: --max-num-batched-tokens N)
#   bash benchmarks/vs_vllm.sh vllm W...          vLLM's side: workloads that share an engine in one call
#   (either side with --profile after the workloads: the first pass under torch.profiler, where the GPU time went,
#   summarised the same way for both: benchmarks/peers/gpu_time.py)
# vLLM comes as ../shared/peers/README.md says: `bash ../shared/peers/prepare.sh .peers` once on the CPU machine,
# then the four chunk stages in back-to-back calls (`run` with carry [".peers/cN"]); an engine starts in ~90 s.
# Workloads and their engines: fits | spill outgrow | reread chat (vLLM: three engine starts).
set -uo pipefail
out="${OUT:-/tmp/out}"; vs=/tmp/vs
mkdir -p "$out" "$vs"
export PYTHONUNBUFFERED=1
stage="${1:?usage: vs_vllm.sh chunk N | tierkv W... | tierkv-paged W... | vllm W...}"; shift
case "$stage" in
    chunk)
        mkdir -p /tmp/vch && cp -r ".peers/c$1" /tmp/vch/ && du -sh "/tmp/vch/c$1"
        if [ "$1" = 4 ]; then
            start=$SECONDS
            bash /tmp/vch/c4/install.sh /tmp/vch 2>&1 | tail -3
            echo "vLLM installed in $((SECONDS - start)) s"
        fi ;;
    tierkv|tierkv-paged)
        bash benchmarks/device_run.sh none > /dev/null 2>&1 || { echo "tierkv install failed"; exit 1; }
        export PYTHONPATH=/tmp/site
        extra=""; [ "$stage" = tierkv-paged ] && extra="--no-prompts-apart"
        # One process per workload: an engine that sized its GPU tier by the free memory leaves none to the next.
        opts=(); names=(); for a in "$@"; do case "$a" in --*|[0-9]*) opts+=("$a") ;; *) names+=("$a") ;; esac; done
        shown='^tierkv|Error|error'; [[ " ${opts[*]} " == *" --profile "* ]] && shown='^[^ ]|^  '  # (the summary whole)
        for w in "${names[@]}"; do
            python3 benchmarks/peers/tierkv_side.py "$w" "${opts[@]}" --out-dir "$vs" $extra 2>&1 | grep -E "$shown" | grep -v Warning
        done ;;
    vllm)
        [ -d /tmp/vsite/vllm ] || { echo "vLLM is not installed here: run the four chunk stages first"; exit 1; }
        PYTHONPATH=/tmp/vsite python3 benchmarks/peers/vllm_side.py "$@" --model /tmp/vch/c4/llama31_8b_dummy \
            --out-dir "$vs" > "$vs/vllm_$1.log" 2>&1
        if [[ " $* " == *" --profile "* ]]; then grep -A40 "under the profiler" "$vs/vllm_$1.log"
        else grep -E "^vllm|^vLLM engine|Error" "$vs/vllm_$1.log" | tail -8; fi ;;
    *) echo "unknown stage $stage"; exit 2 ;;
esac
cp "$vs"/vllm_*.log "$out/" 2>/dev/null
python3 benchmarks/peers/report.py "$vs" --json "$out/vs_vllm_table.json" --bundle "$out/vs_vllm_results.json" \
    | tee "$out/vs_vllm_table.md"
