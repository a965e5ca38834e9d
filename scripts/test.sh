#!/usr/bin/env bash
# Run tierkv's tests (creating .venv/ first if needed). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$repo"
exec "$venv/bin/python" -m pytest -q "$@"
