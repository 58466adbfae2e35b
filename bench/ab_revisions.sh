#!/usr/bin/env bash
# A/B the request path of two revisions on this machine: bench/run.py (1 repeat, no
# profile, no micro) for OLD and NEW alternately, ROUNDS times in each order (the
# second run of a pair tends to see a warmer, slower VM), from a git worktree of OLD.
# Compare "proxy CPU per request" normalised by the bare mitmproxy of the same run.
#   bench/ab_revisions.sh OLD_REV [NEW_REV=HEAD] [ROUNDS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
old_rev=${1:?usage: bench/ab_revisions.sh OLD_REV [NEW_REV] [ROUNDS]}
new_rev=${2:-HEAD}
rounds=${3:-3}
py=$PWD/.venv/bin/python
tmp=$(mktemp -d)
git worktree add -q "$tmp/old" "$old_rev"
git worktree add -q "$tmp/new" "$new_rev"
trap 'git worktree remove --force "$tmp/old"; git worktree remove --force "$tmp/new"; rm -rf "$tmp"' EXIT
run() {  # side round
  # the forward proxy only (revisions with gateway mode in the benchmark would also run it)
  local modes=()
  grep -q -- '"--modes"' "$tmp/$1/bench/run.py" && modes=(--modes forward)
  (cd "$tmp/$1" && PYTHONPATH="$tmp/$1" "$py" bench/run.py --repeats 1 --no-write-docs --no-profile --no-micro "${modes[@]}" \
     > "$tmp/$1-$2.log" 2>&1)
  line=$(grep 'proxy CPU per request' "$tmp/$1-$2.log")
  bare=$(sed -E 's/.*bare ([0-9,]+) .*/\1/' <<<"$line" | tr -d ,)
  proc=$(sed -E 's/.*proctor ([0-9,]+) .*/\1/' <<<"$line" | tr -d ,)
  rps=$(grep -E '^\| Proctor full pipeline' "$tmp/$1-$2.log" | awk -F'|' '{print $4}' | tr -d ' ,')
  printf '%s\t%s\tbare %s µs\tproctor %s µs\tratio %s\tproctor %s req/s\n' "$2" "$1" "$bare" "$proc" \
    "$(awk -v a="$proc" -v b="$bare" 'BEGIN{printf "%.3f", a/b}')" "$rps"
}
for order in "old new" "new old"; do
  for r in $(seq "$rounds"); do
    for side in $order; do run "$side" "$r-${order// /-}"; done
  done
done
