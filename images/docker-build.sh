#!/usr/bin/env bash
# images/docker-build.sh EXECUTOR_BIN [TEMPLATE...]
#
# Builds the operator Dockerfiles (images/base/Dockerfile and
# images/templates/<t>/Dockerfile) with docker build, without a registry, and
# checks that the results are usable sandbox images. `make images-dockerfile`
# runs it, and CI after `make test`, so that the Dockerfiles cannot rot next
# to images/build.sh (which builds the same images without Docker).
#
#   debian:bookworm-slim  the Dockerfiles' FROM, imported into Docker from a
#                         debootstrap --variant=minbase bookworm tree (apt
#                         sources: the host's Debian mirror), unless an image
#                         of that name that this script did not import is
#                         there already (e.g. one pulled from Docker Hub):
#                         that one is used as it is
#   <prefix>base:latest   docker build -f images/base/Dockerfile images/
#   <prefix><t>:latest    docker build -f images/templates/<t>/Dockerfile
#                         --build-arg BASE_IMAGE=<prefix>base:latest images/
#   checks                every image runs as 1000:1000 (user sandbox) in
#                         /workspace (owned by 1000), holds a working
#                         executor and bubblewrap, and its template's
#                         interpreters and Python modules
#
# The debootstrap tree is cached in $IMAGE_CACHE/docker, keyed by a hash of
# the steps that make it and its apt sources, and reuses build.sh's .deb cache
# ($IMAGE_CACHE/apt/archives). The imported image carries that key as the
# label io.sandboxhq.debootstrap-key; it is re-imported only when the key
# changes. docker build's own layer cache makes a run with nothing changed
# take seconds.
#
# Environment:
#   DOCKERFILE_PREFIX   image name prefix (default localhost/sandbox-dockerfile/)
#   IMAGE_CACHE         cache directory (default /var/cache/sandbox-images)
#   IMAGE_REBUILD=1     debootstrap and import anew, docker build the base
#                       with --no-cache (and so the templates anew)
#   DEBIAN_MIRROR       Debian mirror (default: the host's apt sources)
#   DEBIAN_SECURITY_MIRROR  security mirror (default: the host's apt sources)
#   DOCKER_BUILDKIT     passed on to docker build (default 0: the classic
#                       builder, which every Docker has)
set -euo pipefail
umask 022

readonly SUITE=bookworm
readonly DEBIAN_REF=debian:bookworm-slim
readonly KEY_LABEL=io.sandboxhq.debootstrap-key
readonly EXECUTOR_PATH=/usr/local/bin/sandbox-executor
readonly SANDBOX_UID=1000

IMAGES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly IMAGES_DIR
PREFIX=${DOCKERFILE_PREFIX:-localhost/sandbox-dockerfile/}
CACHE=${IMAGE_CACHE:-/var/cache/sandbox-images}
DCACHE="$CACHE/docker"
WORK=        # per-run scratch directory under $DCACHE/work, set in main
COPIED_EXEC= # images/sandbox-executor while this script owns it

log() { printf '[images-docker] %s\n' "$*" >&2; }
die() {
	printf 'images/docker-build.sh: error: %s\n' "$*" >&2
	exit 1
}
now() { date +%s.%N; }
# since T0 prints the seconds elapsed since T0 with one decimal.
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

usage() {
	cat >&2 <<-EOF
		usage: images/docker-build.sh EXECUTOR_BIN [TEMPLATE...]
		  EXECUTOR_BIN  static sandbox-executor binary, copied to images/sandbox-executor
		  TEMPLATE      one of: $(list_templates | tr '\n' ' ')(default: all)
	EOF
	exit 2
}

list_templates() {
	local d
	for d in "$IMAGES_DIR"/templates/*/; do
		[[ -f $d/Dockerfile && -f $d/packages.txt ]] && basename "$d"
	done
}

# packages FILE prints the package names in a packages.txt (comments and
# blank lines dropped), one per line.
packages() { sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$1"; }

sha() { sha256sum | cut -c1-64; }

# debian_sources, find_mirrors (sets MIRROR, SECURITY_MIRROR) and
# apt_sources_list; shared with images/build.sh.
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$IMAGES_DIR/lib.sh"

# logged LOG CMD... runs CMD with its output in LOG; on failure it shows the
# end of LOG and stops the build.
logged() {
	local logfile=$1
	shift
	if ! "$@" >>"$logfile" 2>&1; then
		printf '%s\n' "--- last lines of $logfile:" >&2
		tail -n 40 "$logfile" >&2
		die "failed: $*"
	fi
}

preflight() {
	[[ $EUID -eq 0 ]] || die "must run as root (debootstrap needs it); try: sudo make images-dockerfile"
	local missing=() cmd pkg
	for cmd in debootstrap:debootstrap docker:docker.io tar:tar flock:util-linux sha256sum:coreutils; do
		pkg=${cmd#*:}
		cmd=${cmd%%:*}
		command -v "$cmd" >/dev/null || missing+=("$cmd (apt-get install $pkg)")
	done
	((${#missing[@]} == 0)) || die "missing tools: ${missing[*]}"
	timeout 30 docker version --format '{{.Server.Version}}' >/dev/null 2>&1 ||
		die "dockerd does not answer (start it: systemctl start docker, or dockerd &; or set DOCKER_HOST)"
}

# ---------------------------------------------------------------- scratch space

# unmount_under DIR unmounts everything mounted at or below DIR, deepest
# first (debootstrap mounts /proc and /sys in its target and can leave them
# behind when it fails).
unmount_under() {
	local dir m
	dir=$(realpath "$1")
	awk '{ print $2 }' /proc/self/mounts | sed 's/\\040/ /g' | sort -r | while IFS= read -r m; do
		if [[ $m == "$dir" || $m == "$dir"/* ]]; then
			umount "$m" 2>/dev/null || umount -l "$m" || true
		fi
	done
}

# remove_tree DIR deletes DIR, refusing while anything is mounted below it.
remove_tree() {
	[[ -e $1 ]] || return 0
	unmount_under "$1"
	local dir
	dir=$(realpath "$1")
	! awk '{ print $2 }' /proc/self/mounts | grep -q -e "^$dir\$" -e "^$dir/" ||
		die "refusing to delete $1: something is still mounted below it"
	rm -rf --one-file-system "$1"
}

cleanup() {
	local rc=$?
	[[ -z $COPIED_EXEC ]] || rm -f "$COPIED_EXEC"
	[[ -z $WORK || ! -d $WORK ]] || remove_tree "$WORK" || true
	((rc == 0)) || printf 'images/docker-build.sh: failed (exit %d); logs are in %s/logs/docker-*.log\n' "$rc" "$CACHE" >&2
}

# ---------------------------------------------------------------- debian:bookworm-slim

# build_debian_rootfs KEY makes $DCACHE/debian-$SUITE, a plain minbase tree
# with the host's mirrors as apt sources, slimmed like Debian's -slim images
# (no documentation but copyright files, manuals or translations), unless its
# key matches. The key hashes this function, so changing it rebuilds the tree.
build_debian_rootfs() {
	local key=$1 dest="$DCACHE/debian-$SUITE" logfile="$CACHE/logs/docker-debian.log" t0 r d
	if [[ -d $dest && -f $dest.key && $(<"$dest.key") == "$key" ]]; then
		log "debian rootfs: cached ($(du -sh "$dest" | cut -f1))"
		return
	fi
	t0=$(now)
	: >"$logfile"
	remove_tree "$dest"
	rm -f "$dest.key"
	r="$WORK/debian"
	mkdir -p "$r" "$CACHE/apt/archives/partial"
	# build.sh writes the same .deb cache; its lock keeps the two apart.
	exec 8>"$CACHE/lock"
	flock -n 8 || {
		log "waiting for images/build.sh, which holds $CACHE/lock (the shared .deb cache)..."
		flock -w 3600 8 || die "timed out waiting for $CACHE/lock"
	}
	log "debian rootfs: debootstrap --variant=minbase $SUITE from $MIRROR..."
	logged "$logfile" debootstrap --variant=minbase --components=main \
		--cache-dir="$CACHE/apt/archives" "$SUITE" "$r" "$MIRROR"
	exec 8>&-
	apt_sources_list >"$r/etc/apt/sources.list"
	rm -f "$r"/etc/apt/sources.list.d/*
	# The host's name and resolver (debootstrap copies them) stay out; Docker
	# provides all three at run time.
	: >"$r/etc/resolv.conf"
	echo localhost >"$r/etc/hostname"
	printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$r/etc/hosts"
	find "$r/dev" "$r/tmp" "$r/var/tmp" "$r/run" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
	find "$r/var/log" "$r/var/cache/apt" "$r/var/cache/ldconfig" "$r/var/lib/apt/lists" \
		-mindepth 1 -type f -delete
	rm -f "$r"/var/cache/debconf/*-old "$r"/var/lib/dpkg/*-old
	for d in man info groff lintian linda locale; do
		if [[ -d $r/usr/share/$d ]]; then find "$r/usr/share/$d" -mindepth 1 -delete; fi
	done
	if [[ -d $r/usr/share/doc ]]; then
		find "$r/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
		find "$r/usr/share/doc" -mindepth 1 -type d -empty -delete
	fi
	mkdir -p "$DCACHE"
	mv "$r" "$dest"
	echo "$key" >"$dest.key"
	log "debian rootfs: done in $(since "$t0") ($(du -sh "$dest" | cut -f1))"
}

# ensure_debian KEY makes debian:bookworm-slim the import of the tree for KEY,
# unless an image of that name without our label is there: that one was
# pulled or made by someone else, and is used as it is.
ensure_debian() {
	local key=$1 t0 old current id
	if old=$(docker image inspect -f '{{.Id}}' "$DEBIAN_REF" 2>/dev/null); then
		# Labels as JSON: a template indexing a missing label map can fail,
		# and a failure here must never look like "not ours".
		current=$(docker image inspect -f '{{json .Config.Labels}}' "$DEBIAN_REF" |
			sed -n "s/.*\"${KEY_LABEL//./\\.}\": *\"\([0-9a-f]*\)\".*/\1/p") || current=
		if [[ -z $current ]]; then
			log "$DEBIAN_REF: present and not imported by this script (no $KEY_LABEL label): using it as is"
			return
		fi
		if [[ $current == "$key" && ${IMAGE_REBUILD:-} != 1 ]]; then
			log "$DEBIAN_REF: up to date (${old:7:12}, key ${key:0:12})"
			return
		fi
		replaced "$old"
	fi
	build_debian_rootfs "$key"
	t0=$(now)
	tar --numeric-owner -C "$DCACHE/debian-$SUITE" -c . |
		docker import --change 'CMD ["bash"]' --change "LABEL $KEY_LABEL=$key" \
			--message "images/docker-build.sh: debootstrap --variant=minbase $SUITE" - "$DEBIAN_REF" \
			>>"$CACHE/logs/docker-debian.log" 2>&1 ||
		die "docker import of $DCACHE/debian-$SUITE failed (see $CACHE/logs/docker-debian.log)"
	id=$(docker image inspect -f '{{.Id}}' "$DEBIAN_REF")
	log "$DEBIAN_REF: imported ${id:7:12} in $(since "$t0")"
}

# replaced ID records an image ID one of our tags pointed at before this
# run; remove_replaced deletes them after a successful run (also those a
# failed run left), children first.
replaced() { echo "$1" >>"$DCACHE/replaced"; }
remove_replaced() {
	[[ -f $DCACHE/replaced ]] || return 0
	local id left=()
	while read -r id; do
		# Only while untagged: never an image someone has named since.
		if [[ $(docker image inspect -f '{{len .RepoTags}}' "$id" 2>/dev/null) == 0 ]]; then
			docker image rm "$id" >/dev/null 2>&1 || true
		fi
		# Left for the next run only if still there untagged (docker refused:
		# something uses it).
		[[ $(docker image inspect -f '{{len .RepoTags}}' "$id" 2>/dev/null) != 0 ]] || left+=("$id")
	done < <(tac "$DCACHE/replaced")
	if ((${#left[@]} > 0)); then printf '%s\n' "${left[@]}" | tac >"$DCACHE/replaced"; else rm -f "$DCACHE/replaced"; fi
}

# ---------------------------------------------------------------- images

# build_image NAME DOCKERFILE [docker build flags...] builds $PREFIX$NAME:latest.
build_image() {
	local name=$1 dockerfile=$2 ref="$PREFIX$1:latest" logfile="$CACHE/logs/docker-$1.log" t0 old id steps cached
	shift 2
	local flags=(--network host --force-rm)
	# A base built anew has a new ID, so the templates rebuild anyway; with
	# --no-cache they would also stop sharing their identical first step, and
	# the classic builder's cache would then miss on the next run.
	[[ ${IMAGE_REBUILD:-} != 1 || $name != base ]] || flags+=(--no-cache)
	old=$(docker image inspect -f '{{.Id}}' "$ref" 2>/dev/null) || old=
	t0=$(now)
	: >"$logfile"
	log "image $ref: docker build -f ${dockerfile#"$IMAGES_DIR"/}..."
	logged "$logfile" env DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}" \
		docker build "${flags[@]}" -f "$dockerfile" "$@" -t "$ref" "$IMAGES_DIR"
	id=$(docker image inspect -f '{{.Id}}' "$ref")
	[[ -z $old || $old == "$id" ]] || replaced "$old"
	# The classic builder says "Step i/n" and "Using cache" (never for FROM
	# and ARG); BuildKit says neither.
	steps=$(grep '^Step [0-9]' "$logfile" | grep -cv '^Step [0-9/]* : \(FROM\|ARG\) ') || true
	cached=$(grep -c -- '---> Using cache' "$logfile") || true
	log "image $ref: ${id:7:12} in $(since "$t0")$( ((steps == 0)) || echo " ($cached of $steps steps cached)")"
}

# template_checks T prints what verify_image runs for template T, from its
# packages.txt: "python3" and "nodejs" run their interpreter, and
# python3-<module> imports <module>.
template_checks() {
	local p
	while read -r p; do
		case $p in
		python3 | nodejs) echo "$p" ;;
		python3-*) echo "import:${p#python3-}" ;;
		esac
	done < <(packages "$IMAGES_DIR/templates/$1/packages.txt")
}

# The checks inside an image, run by /bin/sh (dash) as 1000:1000 on a
# read-only root without network. Arguments: what template_checks prints.
# shellcheck disable=SC2016 # expanded by the container's shell
readonly VERIFY_SCRIPT='
set -eu
fail() { echo "check failed: $*" >&2; exit 1; }
[ "$(id -u):$(id -g)" = 1000:1000 ] || fail "runs as $(id -u):$(id -g), not 1000:1000"
u=$(getent passwd 1000) || fail "no user with uid 1000"
[ "${u%%:*}" = sandbox ] || fail "uid 1000 is not sandbox: $u"
[ "$(pwd)" = /workspace ] || fail "working directory $(pwd), not /workspace"
[ "$(stat -c %u:%g /workspace)" = 1000:1000 ] || fail "/workspace is owned by $(stat -c %u:%g /workspace)"
[ "$(stat -c %u:%g /run/sandbox)" = 1000:1000 ] || fail "/run/sandbox is owned by $(stat -c %u:%g /run/sandbox)"
[ -f /usr/local/bin/sandbox-executor ] && [ -x /usr/local/bin/sandbox-executor ] ||
	fail "no executable /usr/local/bin/sandbox-executor"
# A bad LOG_LEVEL makes the executor exit 2 before it serves anything: this
# runs the binary without starting it.
rc=0
out=$(LOG_LEVEL=none /usr/local/bin/sandbox-executor 2>&1) || rc=$?
[ "$rc" = 2 ] && [ "${out#*LOG_LEVEL}" != "$out" ] || fail "the executor did not run (exit $rc): $out"
command -v bwrap >/dev/null || fail "no bwrap"
seen="user sandbox, /workspace, executor, bwrap"
for c in "$@"; do
	case $c in
	python3) v=$(python3 -c "import sys; print(sys.version.split()[0])") || fail "python3 does not run"; seen="$seen, python3 $v" ;;
	nodejs) v=$(node -e "console.log(process.version)") || fail "node does not run"; seen="$seen, node $v" ;;
	import:*) m=${c#import:}; v=$(python3 -c "import $m; print(getattr($m, \"__version__\", \"\"))") || fail "python3 cannot import $m"; seen="$seen, $m $v" ;;
	esac
done
echo "$seen"
'

# verify_image NAME [CHECK...] checks $PREFIX$NAME:latest's config and runs
# VERIFY_SCRIPT in it, the way a sandbox runs: read-only root, no network,
# user 1000, a tmpfs /tmp (the runtime mounts one).
verify_image() {
	local ref="$PREFIX$1:latest" t0 config out
	shift
	t0=$(now)
	config=$(docker image inspect -f '{{.Config.User}} {{json .Config.Entrypoint}} {{.Config.WorkingDir}}' "$ref")
	[[ $config == "$SANDBOX_UID:$SANDBOX_UID [\"$EXECUTOR_PATH\"] /workspace" ]] ||
		die "$ref: config is \"$config\", want user $SANDBOX_UID:$SANDBOX_UID, entrypoint [$EXECUTOR_PATH], working directory /workspace"
	out=$(docker run --rm --network none --read-only --tmpfs /tmp:rw,nosuid,nodev,size=64m \
		--user "$SANDBOX_UID:$SANDBOX_UID" --entrypoint /bin/sh "$ref" -c "$VERIFY_SCRIPT" sh "$@" 2>&1) ||
		die "$ref: $out"
	log "image $ref: verified in $(since "$t0"): $(tail -n 1 <<<"$out")"
}

# ---------------------------------------------------------------- main

main() {
	(($# >= 1)) || usage
	local exec_bin=$1 t
	shift
	[[ -f $exec_bin && -x $exec_bin ]] || die "executor binary $exec_bin is not an executable file"
	local templates=("$@")
	((${#templates[@]} > 0)) || mapfile -t templates < <(list_templates)
	for t in "${templates[@]}"; do
		[[ -f $IMAGES_DIR/templates/$t/Dockerfile ]] || die "unknown template $t (no images/templates/$t/Dockerfile)"
	done

	preflight
	find_mirrors
	local start t0
	start=$(now)
	mkdir -p "$DCACHE" "$CACHE/logs"
	exec 9>"$DCACHE/lock"
	flock -n 9 || {
		log "waiting for another docker-build.sh holding $DCACHE/lock..."
		flock -w 3600 9 || die "timed out waiting for $DCACHE/lock"
	}
	if [[ ${IMAGE_REBUILD:-} == 1 ]]; then
		log "IMAGE_REBUILD=1: discarding $DCACHE/debian-$SUITE; base built with --no-cache"
		remove_tree "$DCACHE/debian-$SUITE"
	fi
	# Leftovers of a killed run.
	[[ ! -d $DCACHE/work ]] || remove_tree "$DCACHE/work"
	WORK="$DCACHE/work/$$"
	mkdir -p "$WORK"
	trap cleanup EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM

	t0=$(now)
	local key
	key=$({
		echo "suite=$SUITE variant=minbase"
		apt_sources_list
		declare -f build_debian_rootfs
	} | sha)
	ensure_debian "$key"
	log "stage $DEBIAN_REF: $(since "$t0")"

	# The build context is images/; .dockerignore lets in the package lists
	# and this copy of the executor (git-ignored).
	COPIED_EXEC="$IMAGES_DIR/sandbox-executor"
	install -m 0755 "$exec_bin" "$COPIED_EXEC"

	t0=$(now)
	build_image base "$IMAGES_DIR/base/Dockerfile"
	for t in "${templates[@]}"; do
		build_image "$t" "$IMAGES_DIR/templates/$t/Dockerfile" --build-arg "BASE_IMAGE=${PREFIX}base:latest"
	done
	rm -f "$COPIED_EXEC"
	COPIED_EXEC=
	log "stage docker build: $(since "$t0")"

	t0=$(now)
	verify_image base
	for t in "${templates[@]}"; do
		local checks
		mapfile -t checks < <(template_checks "$t")
		verify_image "$t" "${checks[@]}"
	done
	log "stage verify: $(since "$t0")"

	# What our tags pointed at before; docker refuses (and we go on) while
	# anything else uses one.
	remove_replaced

	log "all done in $(since "$start"); image sizes (uncompressed, shared layers counted in each):"
	for t in base "${templates[@]}"; do
		log "  $PREFIX$t:latest $(docker image inspect -f '{{.Id}} {{.Size}}' "$PREFIX$t:latest" |
			awk '{ printf "%s %s", substr($1, 8, 12), $2 }' | numfmt --field=2 --to=iec --padding=1)"
	done
}

main "$@"
