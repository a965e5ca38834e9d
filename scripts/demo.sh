#!/usr/bin/env bash
# Run tierkv's main job on its embedded default (creating .venv/ first if needed). Extra arguments go to it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$repo"
exec "$venv/bin/tierkv" bench "$@"
