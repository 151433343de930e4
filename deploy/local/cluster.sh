#!/usr/bin/env bash
# make cluster: three scheduler servers (one Raft cluster) and two agents on
# this machine, on distinct loopback ports, state under .sandbox/cluster/.
# make down stops them.
#
#   server  API             internal        Raft            gossip
#   s1      127.0.0.1:7400  127.0.0.1:7401  127.0.0.1:7300  127.0.0.1:7500
#   s2      127.0.0.1:7410  127.0.0.1:7411  127.0.0.1:7310  127.0.0.1:7510
#   s3      127.0.0.1:7420  127.0.0.1:7421  127.0.0.1:7320  127.0.0.1:7520
#   agent   a1 on 127.0.0.1:7402 (gossip 7502), a2 on 127.0.0.1:7412 (gossip 7512)
#   Go profiles (go tool pprof http://127.0.0.1:PORT/debug/pprof/profile):
#   s1..s3 on 6061..6063, a1 and a2 on 6071 and 6072
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
STATE=$ROOT/.sandbox
export CONTAINERD_ADDRESS=${CONTAINERD_ADDRESS:-/run/containerd/containerd.sock}
source deploy/local/lib.sh
if [ -f "$STATE/sandbox-scheduler.pid" ] && kill -0 "$(cat "$STATE/sandbox-scheduler.pid")" 2>/dev/null; then
	die "the single-server cluster of make up is running on the same ports: make down first"
fi
prepare_host

C=$STATE/cluster
mkdir -p "$C"
peers=127.0.0.1:7401,127.0.0.1:7411,127.0.0.1:7421
gossip=127.0.0.1:7500,127.0.0.1:7510,127.0.0.1:7520
servers=http://127.0.0.1:7401,http://127.0.0.1:7411,http://127.0.0.1:7421
for i in 1 2 3; do
	port=$((7400 + (i - 1) * 10))
	start "sandbox-scheduler-s$i" bin/sandbox-scheduler --id "s$i" --data-dir "$C/s$i" \
		--api-addr "127.0.0.1:$port" --internal-addr "127.0.0.1:$((port + 1))" --raft-addr "127.0.0.1:$((port - 100))" \
		--gossip-addr "127.0.0.1:$((port + 100))" --bootstrap-expect 3 --join "$peers" --gossip-join "$gossip" \
		--api-keys-file "$STATE/api-keys" --cluster-token-file "$STATE/cluster-token" \
		--pprof-addr "127.0.0.1:$((6060 + i))"
done
for i in 1 2; do
	port=$((7402 + (i - 1) * 10))
	start "sandbox-agent-a$i" bin/sandbox-agent --id "local-agent-a$i" --data-dir "$C/a$i" \
		--listen "127.0.0.1:$port" --server "$servers" \
		--gossip-addr "127.0.0.1:$((port + 100))" --gossip-join "$gossip" \
		--cluster-token-file "$STATE/cluster-token" $(agent_runtime_args) \
		--pprof-addr "127.0.0.1:$((6070 + i))"
done
wait_ready
bin/sandboxctl cluster status 2>/dev/null || true
cat <<MSG

A 3-server cluster with 2 agents is up; any server answers (API on :7400, :7410, :7420).
  bin/sandboxctl cluster status
  SANDBOX_ADDR=http://127.0.0.1:7420 bin/sandboxctl exec -c 'print(6*7)'
Stop it with: make down
MSG
