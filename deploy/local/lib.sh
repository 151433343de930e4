# Shared by up.sh and cluster.sh: prepare the host, build, and start daemons.
# Sourced from the repository root with ROOT, STATE and CONTAINERD_ADDRESS set.
# RUNTIME=docker runs the agents on Docker (--runtime docker) instead of
# containerd; containerd runs either way (the image build and dockerd use it).
SECONDS=0
RUNTIME=${RUNTIME:-containerd}
case $RUNTIME in containerd | docker) ;; *) printf 'make up: RUNTIME=%s: want containerd or docker\n' "$RUNTIME" >&2; exit 2 ;; esac
step() { printf '==> [%3ds] %s\n' "$SECONDS" "$*"; }
die() { printf 'make up: %s\n' "$*" >&2; exit 1; }

prepare_host() {
[ "$(id -u)" = 0 ] || die "needs root (containerd and the agent run as root): run sudo make up"
command -v go >/dev/null || die "Go is not on PATH (Go 1.26 is needed to build)"

# 1. System packages.
source deploy/local/packages.sh
missing=$(missing_packages)
if [ "$RUNTIME" = docker ]; then
	command -v dockerd >/dev/null || missing="$missing docker.io"
	command -v skopeo >/dev/null || missing="$missing skopeo"
fi
if [ -n "$missing" ]; then
	step "installing: $missing"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# 2. Unprivileged user namespaces: bubblewrap needs them inside the sandbox.
if ! setpriv --reuid=65534 --regid=65534 --clear-groups bwrap --ro-bind / / --unshare-all --dev /dev true 2>/dev/null; then
	cat >&2 <<'MSG'
make up: this host blocks unprivileged user namespaces, which bubblewrap needs
inside every sandbox. To allow them:
  sysctl -w kernel.apparmor_restrict_unprivileged_userns=0   # Ubuntu 23.10+ (AppArmor)
  sysctl -w kernel.unprivileged_userns_clone=1               # older Debian/Ubuntu kernels
  sysctl -w user.max_user_namespaces=15000                   # if it is 0
Persist the setting in /etc/sysctl.d/ and run make up again.
MSG
	exit 1
fi

# 3. containerd.
mkdir -p "$STATE/logs"
if ! ctr -a "$CONTAINERD_ADDRESS" version >/dev/null 2>&1; then
	step "starting containerd"
	if [ -d /run/systemd/system ] && systemctl start containerd 2>/dev/null; then :; else
		nohup containerd --address "$CONTAINERD_ADDRESS" >"$STATE/logs/containerd.log" 2>&1 &
	fi
	for _ in $(seq 100); do ctr -a "$CONTAINERD_ADDRESS" version >/dev/null 2>&1 && break; sleep 0.1; done
	ctr -a "$CONTAINERD_ADDRESS" version >/dev/null 2>&1 || die "containerd did not start; see $STATE/logs/containerd.log"
fi

# 3b. dockerd, for RUNTIME=docker.
if [ "$RUNTIME" = docker ] && ! docker version >/dev/null 2>&1; then
	step "starting dockerd"
	if [ -d /run/systemd/system ] && systemctl start docker 2>/dev/null; then :; else
		nohup dockerd --containerd "$CONTAINERD_ADDRESS" >"$STATE/logs/dockerd.log" 2>&1 &
	fi
	for _ in $(seq 300); do docker version >/dev/null 2>&1 && break; sleep 0.1; done
	docker version >/dev/null 2>&1 || die "dockerd did not start; see $STATE/logs/dockerd.log"
fi

# 4. Build and images (loaded into Docker too for RUNTIME=docker).
step "building"
make --no-print-directory build >/dev/null
step "building images (cached after the first run)"
if [ "$RUNTIME" = docker ]; then
	DOCKER_LOAD=1 images/build.sh bin/sandbox-executor
else
	images/build.sh bin/sandbox-executor
fi

# 5. Keys.
umask 077
newkey() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
[ -s "$STATE/api-key" ] || newkey >"$STATE/api-key"
[ -s "$STATE/cluster-token" ] || newkey >"$STATE/cluster-token"
# The development key is an admin key: it manages templates and the cluster
# too. Add tenants' keys as "TENANT KEY" lines (docs/operations.md).
printf 'dev %s admin\n' "$(cat "$STATE/api-key")" >"$STATE/api-keys"
umask 022
}

# agent_runtime_args prints the agent's flags for RUNTIME.
agent_runtime_args() {
	if [ "$RUNTIME" = docker ]; then
		echo --runtime docker
	else
		echo --runtime containerd --containerd-address "$CONTAINERD_ADDRESS"
	fi
}

start() { # name, then the command
	local name=$1; shift
	local pidf=$STATE/$name.pid
	if [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; then
		if [ "$1" -nt "$pidf" ]; then
			step "restarting $name (new binary)"
			deploy/local/down.sh "$name" >/dev/null
		elif [ "$*" != "$(cat "$pidf.args" 2>/dev/null)" ]; then
			step "restarting $name (new flags)"
			deploy/local/down.sh "$name" >/dev/null
		else
			step "$name already running (pid $(cat "$pidf"))"
			return
		fi
	fi
	step "starting $name"
	nohup "$@" >>"$STATE/logs/$name.log" 2>&1 &
	echo $! >"$pidf"
	echo "$*" >"$pidf.args"
}

# wait_ready runs the sample execution until it works (the cluster is then
# healthy: the API answers, a leader exists and an agent has registered).
wait_ready() {
	step "waiting for the cluster"
	export SANDBOX_ADDR=${SANDBOX_ADDR:-http://127.0.0.1:7400} SANDBOX_API_KEY=$(cat "$STATE/api-key")
	local ok= out=
	for _ in $(seq 300); do
		if out=$(bin/sandboxctl exec --template python-basic -c 'print("hello from a sandbox:", 6*7)' 2>&1); then ok=1; break; fi
		sleep 0.2
	done
	[ -n "$ok" ] || die "the cluster did not become healthy: $out
logs: $STATE/logs/"
	step "sample execution:"
	echo "    $out"
}
