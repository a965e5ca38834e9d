#!/usr/bin/env bash
# Run tierkv's main job: the demo (configs/demo.yaml: SmolLM2-135M-Instruct, shipped in a Python package, with its
# KV cache spread over all three tiers), creating .venv/ first if needed. Extra arguments go to `tierkv run`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$repo"
exec "$venv/bin/tierkv" run "$@"
