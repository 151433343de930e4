#!/usr/bin/env bash
# make down: stop what make up started (all daemons, or the ones named).
# Sessions' containers are destroyed by the agent as it stops.
set -euo pipefail
cd "$(dirname "$0")/../.."
STATE=$PWD/.sandbox
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
	# Agents first (they destroy their containers), then servers.
	for f in "$STATE"/sandbox-agent*.pid "$STATE"/sandbox-scheduler*.pid; do
		[ -f "$f" ] && names+=("$(basename "$f" .pid)")
	done
fi
for name in "${names[@]}"; do
	pidf=$STATE/$name.pid
	[ -f "$pidf" ] || continue
	pid=$(cat "$pidf")
	if kill -0 "$pid" 2>/dev/null; then
		echo "stopping $name (pid $pid)"
		kill -TERM "$pid"
		for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
		kill -0 "$pid" 2>/dev/null && { echo "$name did not stop in 10s; killing"; kill -KILL "$pid"; }
	fi
	rm -f "$pidf"
done
