#!/usr/bin/env bash
# The same fast-path items on two source trees in one call, alternating (new, old, new, old ...), so that a change
# meant to keep speed is measured against its parent under the same machine state.
#   bash benchmarks/ab_trees.sh OLD_TREE ROUNDS ITEMS...      e.g.  bash benchmarks/ab_trees.sh .old 1 1 4
# OLD_TREE: a copy of the older commit's files (`git archive <commit> | tar -x -C .old`; carried to the device
# machine as an ignored folder). Both trees run against the same installed dependencies; the older one is put first
# on PYTHONPATH. JSON per item and tree in $OUT/new-N and $OUT/old-N.
set -uo pipefail
old="$(cd "$1" && pwd)"; rounds="$2"; shift 2
out="${OUT:-/tmp/out}"
for link in kernels policies configs; do  # the package's links to the top-level folders, in case the copy lost them
    [ -e "$old/tierkv/$link" ] || ln -sfn "../$link" "$old/tierkv/$link"
done
for round in $(seq 1 "$rounds"); do
    for tree in new old; do
        dir="$out/$tree-$round"; mkdir -p "$dir"
        if [ "$tree" = new ]; then
            (OUT="$dir" bash benchmarks/fast_path.sh "$@") 2>&1 | sed "s/^/$tree-$round: /"
        else
            (cd "$old" && PYTHONPATH="$old:${PYTHONPATH:-}" OUT="$dir" bash benchmarks/fast_path.sh "$@") 2>&1 | sed "s/^/$tree-$round: /"
        fi
    done
done
