#!/usr/bin/env bash
# One serving measurement: start `tokenforge serve` with the given options, wait until it is ready, run
# `tokenforge bench serve` against it, keep the server's /metrics beside the figures (OUT.metrics), stop
# the server. Used for the README's cluster figures.
#   [PORT=8123] [SETTLE=SECONDS] scripts/bench_cluster.sh OUT.json "SERVE OPTIONS" "BENCH SERVE OPTIONS"
set -euo pipefail
out=$1; serve_opts=$2; bench_opts=$3
bin=$(dirname "$0")/../.venv/bin
port=${PORT:-8123}
log=$(mktemp)
# shellcheck disable=SC2086
"$bin/tokenforge" serve --port "$port" $serve_opts >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 600); do
    grep -q "ready in" "$log" && break
    kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.5
done
grep "ready in" "$log"
sleep "${SETTLE:-0}"  # SETTLE=N: wait N seconds after ready (e.g. for Ray's own processes to finish starting)
# shellcheck disable=SC2086
"$bin/tokenforge" bench serve --base-url "http://127.0.0.1:$port" --no-progress --json $bench_opts | tee "$out"
"$bin/python" -c "import httpx, sys; sys.stdout.write(httpx.get('http://127.0.0.1:$port/metrics').text)" \
    >"$out.metrics"
grep -E "^tokenforge_prefix_cache_hit_rate|^tokenforge_cluster_pd_transfer" "$out.metrics" || true
