#!/usr/bin/env bash
# The wheels a device machine's image lacks, for its Python 3.12, into .whl/ (ignored by git; carried to the machine
# with `carry: [".whl"]`, installed by benchmarks/device_run.sh into /tmp/site): kvikio for the NVMe tier, and what
# `tierkv serve` and benchmarks/serve_load.py need (the server's web stack and the HTTP client), at the versions
# constraints.txt pins. Needs the package registry (run it here, on the CPU machine).   Usage: bash scripts/device_wheels.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
pins() { for p in "$@"; do grep -i -m1 -E "^${p//-/[-_]}==" constraints.txt || { echo "no pin for $p in constraints.txt" >&2; exit 1; }; done; }
plat="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64"
for p in 17 24 27; do plat="$plat --platform manylinux_2_${p}_x86_64"; done
plat="$plat --platform manylinux2014_x86_64"
mkdir -p .whl
# kvikio alone (its CUDA libraries are on the image); the web stack with its whole dependency closure, so that a new
# dependency of one of them (fastapi's opentelemetry-api, httpx2's truststore) comes along, at the pinned versions.
python3 -m pip download -q --no-deps $plat -d .whl $(pins kvikio-cu13 libkvikio-cu13 rapids-logger)
python3 -m pip download -q -c constraints.txt $plat -d .whl fastapi uvicorn prometheus-client httpx2
du -sh .whl
