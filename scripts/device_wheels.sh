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
python3 -m pip download -q --no-deps $plat -d .whl $(pins kvikio-cu13 libkvikio-cu13 rapids-logger \
    fastapi starlette pydantic pydantic-core annotated-types annotated-doc typing-inspection typing-extensions \
    uvicorn h11 click anyio sniffio idna prometheus-client httpx2 httpcore2 truststore certifi)
du -sh .whl
