#!/bin/sh
# chaos-summary.sh DIR: p50, p99 and max of the chaos runs' measurements in
# DIR (written by make test-chaos): the leader-kill recovery and how soon a
# killed agent's session was LOST.
set -eu
dir=${1:?usage: chaos-summary.sh DIR}
summary() { # file field goal
	[ -s "$dir/$1" ] || { echo "$1: no runs recorded"; return; }
	grep -o "\"$2\":[-0-9.]*" "$dir/$1" | cut -d: -f2 | sort -n | awk -v f="$1" -v k="$2" -v goal="$3" '
		{ v[NR] = $1 }
		END {
			p50 = v[int(0.50 * NR + 0.5) > 0 ? int(0.50 * NR + 0.5) : 1]
			i = int(0.99 * NR + 0.5); if (i < 1) i = 1; if (i > NR) i = NR
			printf "%s: %d runs, %s p50 %.0f ms, p99 %.0f ms, max %.0f ms (goal: p99 <= %s ms)\n", f, NR, k, p50, v[i], v[NR], goal
		}'
}
summary failover.jsonl recovery_ms 1000
summary agent-death.jsonl lost_ms 3000
