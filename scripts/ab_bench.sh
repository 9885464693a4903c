#!/usr/bin/env bash
# Interleaved A/B runs of one `tokenforge bench` mode on two source trees (e.g. a `git worktree` of an older
# commit, with its kernels built by `python setup.py build_ext --inplace`, against this checkout), so drift in
# the machine's speed hits both sides alike. Prints each run's result line; quote the medians and ratios.
#   scripts/ab_bench.sh PAIRS OLD_TREE NEW_TREE "BENCH ARGS" ["NEW-ONLY ARGS"]
#   scripts/ab_bench.sh 10 /tmp/pre107 . "latency --model /tmp/models/smol-f32 --threads 2 --skip-reference --repeats 3" "--no-bandwidth"
set -euo pipefail
pairs=$1; old=$(realpath "$2"); new=$(realpath "$3"); args=$4; new_only=${5:-}
py="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
for _ in $(seq "$pairs"); do
    for side in old new; do
        if [ "$side" = old ]; then tree=$old; extra=""; else tree=$new; extra=$new_only; fi
        # shellcheck disable=SC2086
        line=$(cd /tmp && PYTHONPATH="$tree/src" "$py" -m tokenforge.cli bench $args $extra 2>&1 \
               | grep -E "^tokenforge( |$)|^tokenforge \(|rror" | tail -1)
        echo "$side $line"
    done
done
