#!/usr/bin/env bash
# make up: install what is missing, build, build the images, start one
# scheduler and one agent in the background, run a sample execution.
# State, logs and pid files live under .sandbox/ (gitignored). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
STATE=$ROOT/.sandbox
export CONTAINERD_ADDRESS=${CONTAINERD_ADDRESS:-/run/containerd/containerd.sock}
source deploy/local/lib.sh
prepare_host

# 6. Daemons: started if not running, restarted if their binary changed.
start sandbox-scheduler bin/sandbox-scheduler --id local-1 --data-dir "$STATE/scheduler" \
	--api-addr 127.0.0.1:7400 --internal-addr 127.0.0.1:7401 --raft-addr 127.0.0.1:7300 \
	--api-keys-file "$STATE/api-keys" --cluster-token-file "$STATE/cluster-token"
start sandbox-agent bin/sandbox-agent --id local-agent-1 --data-dir "$STATE/agent" \
	--listen 127.0.0.1:7402 --server http://127.0.0.1:7401 \
	--gossip-addr 127.0.0.1:7501 --gossip-join 127.0.0.1:7500 \
	--cluster-token-file "$STATE/cluster-token" $(agent_runtime_args)

wait_ready
cat <<MSG

The local cluster is up (agent on $RUNTIME): API on http://127.0.0.1:7400, key in .sandbox/api-key, logs in .sandbox/logs/.
Try:
  bin/sandboxctl exec --template python-basic -c 'print(6*7)'
  bin/sandboxctl exec --template nodejs-basic --language node -c 'console.log(6*7)'
  bin/sandboxctl sessions list
  curl -H "Authorization: Bearer \$(cat .sandbox/api-key)" -H 'Content-Type: application/json' \\
       -d '{"templateId":"python-basic"}' http://127.0.0.1:7400/sandbox.v1.SessionService/CreateSession
Stop it with: make down
MSG
