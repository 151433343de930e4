#!/usr/bin/env bash
# images/build.sh EXECUTOR_BIN [TEMPLATE...]
#
# Builds the sandbox template images without a registry or Docker, and
# imports them into containerd (namespace "sandbox") as
# localhost/sandbox/<template>:latest and localhost/sandbox/base:latest.
#
#   base rootfs      debootstrap bookworm minbase + images/base/packages.txt,
#                    user sandbox (1000:1000), /workspace, /run/sandbox
#   template rootfs  an overlayfs upper directory over the base rootfs with
#                    images/templates/<t>/packages.txt installed
#   layers           base rootfs | template upper | executor binary
#   image            OCI archive written by images/ocitar, then
#                    "ctr images import" (unpacked for overlayfs)
#
# Every stage is cached in $IMAGE_CACHE (default /var/cache/sandbox-images),
# keyed by a hash of its inputs: this script, the package lists, the ocitar
# sources (layers only) and the executor binary (its own layer only). A run
# with nothing changed checks that containerd still holds the expected
# manifests and unpacked snapshots, and re-imports only what is missing.
#
# Environment:
#   CONTAINERD_ADDRESS  containerd socket (default /run/containerd/containerd.sock)
#   IMAGE_CACHE         cache directory (default /var/cache/sandbox-images)
#   IMAGE_REBUILD=1     discard the cache first and rebuild everything
#   DEBIAN_MIRROR       Debian mirror (default: the host's apt sources)
#   DEBIAN_SECURITY_MIRROR  security mirror (default: the host's apt sources)
#   OCITAR              a prebuilt images/ocitar binary (default: go build it)
#   DOCKER_LOAD         auto (default): also load every image into Docker when a
#                       Docker daemon answers (for agents run with --runtime
#                       docker; needs skopeo); 1: require it; 0: never
#   PUSH                a registry (host:port): also push every image there as
#                       <PUSH>/sandbox/<template>:latest, for agents that pull
#                       (plain HTTP for loopback hosts and PUSH_PLAIN_HTTP=1)
#
# The Dockerfiles under images/ are the same build for operators with a
# registry; keep them and the steps below in step (see images/README.md).
set -euo pipefail
umask 022

readonly SUITE=bookworm
readonly NS=sandbox
readonly PREFIX=localhost/sandbox/
readonly EXECUTOR_PATH=/usr/local/bin/sandbox-executor
readonly IMAGE_PATH_ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
readonly SANDBOX_UID=1000

IMAGES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly IMAGES_DIR
readonly SCRIPT="$IMAGES_DIR/build.sh"
CACHE=${IMAGE_CACHE:-/var/cache/sandbox-images}
ADDR=${CONTAINERD_ADDRESS:-/run/containerd/containerd.sock}
WORK= # per-run scratch directory under $CACHE/work, set in main

log() { printf '[images] %s\n' "$*" >&2; }
die() {
	printf 'images/build.sh: error: %s\n' "$*" >&2
	exit 1
}
now() { date +%s.%N; }
# since T0 prints the seconds elapsed since T0 with one decimal.
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

usage() {
	cat >&2 <<-EOF
		usage: images/build.sh EXECUTOR_BIN [TEMPLATE...]
		  EXECUTOR_BIN  static sandbox-executor binary, copied to $EXECUTOR_PATH
		  TEMPLATE      one of: $(list_templates | tr '\n' ' ')(default: all)
	EOF
	exit 2
}

list_templates() {
	local d
	for d in "$IMAGES_DIR"/templates/*/; do
		[[ -f $d/packages.txt ]] && basename "$d"
	done
}

# packages FILE prints the package names in a packages.txt (comments and
# blank lines dropped), one per line.
packages() { sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$1"; }

sha() { sha256sum | cut -c1-64; }

# ---------------------------------------------------------------- checks

preflight() {
	[[ $EUID -eq 0 ]] || die "must run as root (debootstrap, chroot and mounts need it); try: sudo make images"
	local missing=() cmd pkg
	for cmd in debootstrap:debootstrap ctr:containerd chroot:coreutils mount:mount flock:util-linux sha256sum:coreutils; do
		pkg=${cmd#*:}
		cmd=${cmd%%:*}
		command -v "$cmd" >/dev/null || missing+=("$cmd (apt-get install $pkg)")
	done
	((${#missing[@]} == 0)) || die "missing tools: ${missing[*]}"
	grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null ||
		die "the kernel has no overlayfs (modprobe overlay failed); the template layers need it"
	timeout 15 ctr -a "$ADDR" version >/dev/null 2>&1 ||
		die "containerd does not answer at $ADDR (start it: systemctl start containerd, or containerd &; or set CONTAINERD_ADDRESS)"
}

# debian_sources, find_mirrors (sets MIRROR, SECURITY_MIRROR) and
# apt_sources_list; shared with images/docker-build.sh.
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$IMAGES_DIR/lib.sh"

# ---------------------------------------------------------------- mounts

# unmount_under DIR unmounts everything mounted at or below DIR, deepest
# first; unmount_below DIR spares DIR itself.
unmount_under() { unmount_mounts "$1" include; }
unmount_below() { unmount_mounts "$1" exclude; }
unmount_mounts() {
	local dir=$1 self=$2 m
	[[ -d $dir ]] || return 0
	dir=$(realpath "$dir")
	awk '{ print $2 }' /proc/self/mounts | sed 's/\\040/ /g' | sort -r | while IFS= read -r m; do
		if [[ ($self == include && $m == "$dir") || $m == "$dir"/* ]]; then
			umount "$m" 2>/dev/null || umount -l "$m" || true
		fi
	done
}

# mounted_under DIR succeeds if anything is still mounted at or below DIR.
mounted_under() {
	local dir
	dir=$(realpath "$1")
	awk '{ print $2 }' /proc/self/mounts | grep -q -e "^$dir\$" -e "^$dir/"
}

# remove_tree DIR deletes DIR, refusing while anything is mounted below it
# (a bind mount must never turn an rm into a deletion on the host).
remove_tree() {
	[[ -e $1 ]] || return 0
	unmount_under "$1"
	! mounted_under "$1" || die "refusing to delete $1: something is still mounted below it"
	rm -rf --one-file-system "$1"
}

cleanup() {
	local rc=$?
	if [[ -n $WORK && -d $WORK ]]; then
		unmount_under "$WORK"
		if mounted_under "$WORK"; then
			printf 'images/build.sh: warning: mounts left under %s\n' "$WORK" >&2
		else
			rm -rf --one-file-system "$WORK"
		fi
	fi
	((rc == 0)) || printf 'images/build.sh: failed (exit %d); logs are in %s/logs\n' "$rc" "$CACHE" >&2
}

# chroot_mounts ROOT mounts what apt and maintainer scripts need in ROOT:
# proc, a read-only sysfs, a private /dev with the basic nodes, tmpfs /run
# and /tmp, the host's resolv.conf, and the shared apt caches (so that
# package lists and .deb files never land in a layer). cleanup unmounts them
# all, also on failure.
chroot_mounts() {
	local root=$1
	mount -t proc proc "$root/proc"
	mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
	mount -t tmpfs -o mode=0755,nosuid,size=16m tmpfs "$root/dev"
	mknod -m 0666 "$root/dev/null" c 1 3
	mknod -m 0666 "$root/dev/zero" c 1 5
	mknod -m 0666 "$root/dev/full" c 1 7
	mknod -m 0666 "$root/dev/random" c 1 8
	mknod -m 0666 "$root/dev/urandom" c 1 9
	mknod -m 0666 "$root/dev/tty" c 5 0
	ln -s /proc/self/fd "$root/dev/fd"
	mkdir -p "$root/dev/pts" "$root/dev/shm"
	mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$root/run"
	mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"
	[[ -e $root/etc/resolv.conf ]] || : >"$root/etc/resolv.conf"
	mount --bind -o ro /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null ||
		mount --bind /etc/resolv.conf "$root/etc/resolv.conf"
	mkdir -p "$CACHE/apt/lists/partial" "$CACHE/apt/archives/partial"
	mount --bind "$CACHE/apt/lists" "$root/var/lib/apt/lists"
	mount --bind "$CACHE/apt/archives" "$root/var/cache/apt/archives"
}

# in_chroot ROOT CMD... runs CMD in ROOT with a clean environment.
in_chroot() {
	local root=$1
	shift
	env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 \
		DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true \
		${http_proxy:+http_proxy=$http_proxy} ${https_proxy:+https_proxy=$https_proxy} \
		chroot "$root" "$@"
}

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

# strip_rootfs ROOT removes what a sandbox never needs: package caches,
# logs, documentation (copyright files stay), manuals and translations.
strip_rootfs() {
	local r=$1 d
	find "$r/var/log" "$r/var/cache/apt" "$r/var/cache/ldconfig" "$r/var/lib/apt/lists" \
		-mindepth 1 -type f -delete
	rm -f "$r"/var/cache/debconf/*-old "$r"/var/lib/dpkg/*-old
	for d in man info groff lintian linda locale; do
		[[ -d $r/usr/share/$d ]] && find "$r/usr/share/$d" -mindepth 1 -delete
	done
	if [[ -d $r/usr/share/doc ]]; then
		find "$r/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
		find "$r/usr/share/doc" -mindepth 1 -type d -empty -delete
	fi
}

# ---------------------------------------------------------------- rootfs stages

# build_base builds $CACHE/rootfs/base unless its key matches.
build_base() {
	local key=$1 dest="$CACHE/rootfs/base" logfile="$CACHE/logs/base.log" t0 r
	if [[ -d $dest && -f $dest.key && $(<"$dest.key") == "$key" ]]; then
		log "base rootfs: cached ($(du -sh "$dest" | cut -f1))"
		return
	fi
	t0=$(now)
	: >"$logfile"
	remove_tree "$dest"
	rm -f "$dest.key"
	r="$WORK/base"
	mkdir -p "$r"
	log "base rootfs: debootstrap $SUITE minbase from $MIRROR (about a minute)..."
	mkdir -p "$CACHE/apt/archives/partial"
	logged "$logfile" debootstrap --variant=minbase --components=main \
		--cache-dir="$CACHE/apt/archives" \
		--include="$(packages "$IMAGES_DIR/base/packages.txt" | paste -sd,)" \
		"$SUITE" "$r" "$MIRROR"
	log "base rootfs: debootstrap done in $(since "$t0")"

	# Equivalent of images/base/Dockerfile from here on.
	apt_sources_list >"$r/etc/apt/sources.list"
	write_apt_dpkg_config "$r"
	local t1
	t1=$(now)
	chroot_mounts "$r"
	logged "$logfile" in_chroot "$r" apt-get update
	logged "$logfile" in_chroot "$r" apt-get -y dist-upgrade
	logged "$logfile" in_chroot "$r" groupadd --gid "$SANDBOX_UID" sandbox
	logged "$logfile" in_chroot "$r" useradd --uid "$SANDBOX_UID" --gid "$SANDBOX_UID" \
		--home-dir /home/sandbox --create-home --shell /bin/bash sandbox
	unmount_under "$r"
	install -d -m 0755 -o "$SANDBOX_UID" -g "$SANDBOX_UID" "$r/workspace" "$r/run/sandbox"
	# The runtime provides these; the build host's must not leak into images.
	: >"$r/etc/resolv.conf"
	echo sandbox >"$r/etc/hostname"
	printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$r/etc/hosts"
	# The runtime mounts /dev; bubblewrap builds its own.
	find "$r/dev" -mindepth 1 -delete
	find "$r/tmp" "$r/var/tmp" "$r/run" -mindepth 1 -maxdepth 1 ! -name sandbox -exec rm -rf {} +
	strip_rootfs "$r"
	mkdir -p "$CACHE/rootfs"
	mv "$r" "$dest"
	echo "$key" >"$dest.key"
	log "base rootfs: upgrade, user, strip done in $(since "$t1") (total $(since "$t0"), $(du -sh "$dest" | cut -f1))"
}

# write_apt_dpkg_config ROOT makes apt skip recommends and binary caches and
# dpkg skip documentation, so that template layers never hold them.
write_apt_dpkg_config() {
	local r=$1
	cat >"$r/etc/apt/apt.conf.d/90sandbox" <<-'EOF'
		APT::Install-Recommends "false";
		APT::Install-Suggests "false";
		Dir::Cache::pkgcache "";
		Dir::Cache::srcpkgcache "";
		Acquire::Retries "3";
	EOF
	cat >"$r/etc/dpkg/dpkg.cfg.d/90sandbox-excludes" <<-'EOF'
		path-exclude=/usr/share/doc/*
		path-include=/usr/share/doc/*/copyright
		path-exclude=/usr/share/man/*
		path-exclude=/usr/share/info/*
		path-exclude=/usr/share/groff/*
		path-exclude=/usr/share/lintian/*
		path-exclude=/usr/share/locale/*
	EOF
}

# build_template T KEY builds $CACHE/rootfs/T, the overlayfs upper directory
# holding T's packages on top of the base rootfs, unless its key matches.
build_template() {
	local t=$1 key=$2 dest="$CACHE/rootfs/$1" logfile="$CACHE/logs/$1.log" t0 w
	if [[ -d $dest && -f $dest.key && $(<"$dest.key") == "$key" ]]; then
		log "$t rootfs: cached ($(du -sh "$dest" | cut -f1) over base)"
		return
	fi
	t0=$(now)
	: >"$logfile"
	remove_tree "$dest"
	rm -f "$dest.key"
	w="$WORK/$t"
	mkdir -p "$w/upper" "$w/ovlwork" "$w/merged"
	log "$t rootfs: installing $(packages "$IMAGES_DIR/templates/$t/packages.txt" | paste -sd' ')..."
	# redirect_dir and metacopy off: every change must be a plain file,
	# directory or whiteout in the upper directory, which is the layer.
	mount -t overlay overlay \
		-o "lowerdir=$CACHE/rootfs/base,upperdir=$w/upper,workdir=$w/ovlwork,redirect_dir=off,metacopy=off,index=off" \
		"$w/merged"
	chroot_mounts "$w/merged"
	# Equivalent of images/templates/<t>/Dockerfile.
	logged "$logfile" in_chroot "$w/merged" apt-get update
	# shellcheck disable=SC2046 # one word per package
	logged "$logfile" in_chroot "$w/merged" apt-get install -y $(packages "$IMAGES_DIR/templates/$t/packages.txt")
	unmount_below "$w/merged"
	# Strip through the overlay so that nothing of the base is touched; the
	# config above already kept most of it from being written.
	strip_rootfs "$w/merged"
	umount "$w/merged"
	remove_tree "$w/ovlwork"
	mv "$w/upper" "$dest"
	echo "$key" >"$dest.key"
	log "$t rootfs: done in $(since "$t0") ($(du -sh "$dest" | cut -f1) over base)"
}

# ---------------------------------------------------------------- layers and images

# ensure_ocitar sets OCITAR to a binary built from images/ocitar.
ensure_ocitar() {
	if [[ -n ${OCITAR:-} ]]; then
		[[ -x $OCITAR ]] || die "OCITAR=$OCITAR is not executable"
		return
	fi
	OCITAR="$CACHE/bin/ocitar-${OCITAR_HASH:0:16}"
	[[ -x $OCITAR ]] && return
	command -v go >/dev/null || die "go not found: it builds images/ocitar (or set OCITAR to a prebuilt binary)"
	local t0
	t0=$(now)
	mkdir -p "$CACHE/bin"
	(cd "$IMAGES_DIR/ocitar" && CGO_ENABLED=0 go build -trimpath -o "$OCITAR.tmp" .) ||
		die "building images/ocitar failed"
	mv "$OCITAR.tmp" "$OCITAR"
	log "ocitar: built in $(since "$t0")"
}

# ensure_layer NAME KEY [ocitar layer flags...] SRC prints the path of the
# descriptor of layer NAME for KEY, building it if needed and dropping the
# blobs of older keys of the same NAME.
ensure_layer() {
	local name=$1 key=$2 desc old t0
	shift 2
	desc="$CACHE/layers/$name-${key:0:32}.json"
	if [[ -f $desc ]] && [[ -f $CACHE/blobs/sha256/$(layer_field "$desc" digest) ]]; then
		echo "$desc"
		return
	fi
	t0=$(now)
	mkdir -p "$CACHE/layers"
	"$OCITAR" layer -blobs "$CACHE/blobs" -desc "$desc" "$@" >&2 || die "writing layer $name failed"
	for old in "$CACHE/layers/$name"-*.json; do
		[[ $old == "$desc" ]] && continue
		rm -f "$CACHE/blobs/sha256/$(layer_field "$old" digest)" "$old"
	done
	log "layer $name: $(layer_field "$desc" size | numfmt --to=iec) compressed, written in $(since "$t0")" >&2
	echo "$desc"
}

# layer_field DESC FIELD prints a field of a layer descriptor (sha256: dropped).
layer_field() {
	sed -n "s/^ *\"$2\": *\"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}\$/\1/p" "$1" | sed 's/^sha256://'
}

# ensure_image NAME DESC... makes localhost/sandbox/NAME:latest in containerd
# the image of these layers: it checks the manifest digest and the unpacked
# snapshot, and writes and imports the archive only when they differ. With
# Docker in use (docker_wanted), it loads the same image into Docker too.
ensure_image() {
	local name=$1 ref="$PREFIX$1:latest" t0 manifest chain current
	shift
	IMAGE_ARGS=(-blobs "$CACHE/blobs" -name "$ref" -user "$SANDBOX_UID:$SANDBOX_UID"
		-entrypoint "$EXECUTOR_PATH" -workdir /workspace -env "$IMAGE_PATH_ENV"
		-label "org.opencontainers.image.title=sandbox $name"
		-label "io.sandboxhq.template=$name")
	t0=$(now)
	read -r manifest chain < <("$OCITAR" image "${IMAGE_ARGS[@]}" "$@" | awk -F'"' '/"manifest"/ { m = $4 } /"chainID"/ { c = $4 } END { print m, c }')
	[[ -n $manifest && -n $chain ]] || die "computing the manifest of $ref failed"
	((DOCKER_LOAD_ON == 0)) || ensure_docker_image "$name" "$manifest" "$@"
	current=$(ctr -a "$ADDR" -n "$NS" images ls "name==$ref" | awk 'NR > 1 { print $3 }')
	if [[ $current == "$manifest" ]] &&
		ctr -a "$ADDR" -n "$NS" snapshots --snapshotter overlayfs info "$chain" >/dev/null 2>&1; then
		log "image $ref: up to date (${manifest:7:12}) in $(since "$t0")"
		return
	fi
	local archive
	archive=$(write_archive "$name" "$manifest" "$@")
	# One retry: an unpack can lose a race with containerd's garbage collector
	# over a parent snapshot another image just stopped referencing ("parent
	# snapshot ... does not exist"); the second unpack makes the chain anew.
	ctr -a "$ADDR" -n "$NS" images import --snapshotter overlayfs "$archive" >>"$CACHE/logs/import.log" 2>&1 ||
		{ log "import of $ref failed once; retrying"; sleep 1; ctr -a "$ADDR" -n "$NS" images import --snapshotter overlayfs "$archive" >>"$CACHE/logs/import.log" 2>&1; } ||
		die "ctr images import $archive failed (see $CACHE/logs/import.log)"
	current=$(ctr -a "$ADDR" -n "$NS" images ls "name==$ref" | awk 'NR > 1 { print $3 }')
	[[ $current == "$manifest" ]] || die "after import, $ref in namespace $NS is ${current:-missing}, want $manifest"
	ctr -a "$ADDR" -n "$NS" snapshots --snapshotter overlayfs info "$chain" >/dev/null 2>&1 ||
		die "after import, $ref is not unpacked for overlayfs (snapshot $chain missing)"
	log "image $ref: imported ${manifest:7:12} in $(since "$t0")"
}

# write_archive NAME MANIFEST DESC... writes the OCI archive of image NAME
# (IMAGE_ARGS) unless the cached one has MANIFEST, and prints its path.
write_archive() {
	local name=$1 manifest=$2 archive="$CACHE/archives/$1.oci.tar"
	shift 2
	mkdir -p "$CACHE/archives"
	if [[ ! -f $archive || ! -f $archive.manifest || $(<"$archive.manifest") != "$manifest" ]]; then
		rm -f "$archive.manifest"
		"$OCITAR" image "${IMAGE_ARGS[@]}" -out "$archive" "$@" >/dev/null || die "writing $archive failed"
		echo "$manifest" >"$archive.manifest"
	fi
	echo "$archive"
}

# docker_wanted sets DOCKER_LOAD_ON: DOCKER_LOAD=1 loads the images into
# Docker too (and fails without a Docker daemon), 0 never does, and auto
# (the default) does when a Docker daemon answers.
docker_wanted() {
	DOCKER_LOAD_ON=0
	case ${DOCKER_LOAD:-auto} in
	0) return ;;
	1) ;;
	auto) command -v docker >/dev/null && timeout 10 docker version >/dev/null 2>&1 || return 0 ;;
	*) die "DOCKER_LOAD=${DOCKER_LOAD} (want 0, 1 or auto)" ;;
	esac
	command -v docker >/dev/null || die "DOCKER_LOAD=1 but there is no docker client (apt-get install docker.io)"
	timeout 10 docker version >/dev/null 2>&1 || die "DOCKER_LOAD=1 but no Docker daemon answers (start it: dockerd &)"
	command -v skopeo >/dev/null || die "loading the images into Docker needs skopeo (apt-get install skopeo), or set DOCKER_LOAD=0"
	DOCKER_LOAD_ON=1
	log "Docker answers: the images go into Docker too (DOCKER_LOAD=0 to skip)"
}

# ensure_docker_image NAME MANIFEST DESC... loads localhost/sandbox/NAME:latest
# into Docker unless Docker holds the image this script loaded for MANIFEST.
# Docker 20.10 loads Docker-format archives only; skopeo converts the OCI
# archive on the way (docker-daemon: transport, a docker load).
ensure_docker_image() {
	local name=$1 manifest=$2 ref="$PREFIX$1:latest" mark="$CACHE/docker/$1.loaded" t0 id archive
	shift 2
	t0=$(now)
	id=$(docker image inspect --format '{{.Id}}' "$ref" 2>/dev/null || true)
	if [[ -n $id && -f $mark && $(<"$mark") == "$manifest $id" ]]; then
		log "image $ref (Docker): up to date in $(since "$t0")"
		return
	fi
	archive=$(write_archive "$name" "$manifest" "$@")
	skopeo copy -q "oci-archive:$archive" "docker-daemon:$ref" >>"$CACHE/logs/docker-load.log" 2>&1 ||
		die "loading $ref into Docker failed (see $CACHE/logs/docker-load.log)"
	id=$(docker image inspect --format '{{.Id}}' "$ref") || die "after loading, Docker has no $ref"
	mkdir -p "$CACHE/docker"
	echo "$manifest $id" >"$mark"
	log "image $ref (Docker): loaded in $(since "$t0")"
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
		[[ -f $IMAGES_DIR/templates/$t/packages.txt ]] || die "unknown template $t (no images/templates/$t/packages.txt)"
	done

	preflight
	find_mirrors
	docker_wanted
	local start
	start=$(now)
	mkdir -p "$CACHE"
	exec 9>"$CACHE/lock"
	flock -n 9 || {
		log "waiting for another build.sh holding $CACHE/lock..."
		flock -w 3600 9 || die "timed out waiting for $CACHE/lock"
	}
	if [[ ${IMAGE_REBUILD:-} == 1 ]]; then
		log "IMAGE_REBUILD=1: discarding $CACHE"
		local d
		for d in rootfs layers blobs archives bin apt work; do
			remove_tree "${CACHE:?}/$d"
		done
	fi
	# Leftovers of a killed run.
	[[ -d $CACHE/work ]] && remove_tree "$CACHE/work"
	WORK="$CACHE/work/$$"
	mkdir -p "$WORK" "$CACHE/logs"
	trap cleanup EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM

	OCITAR_HASH=$(cat "$IMAGES_DIR"/ocitar/*.go | sha)
	local base_key exec_key base_desc exec_desc tdesc
	base_key=$({
		echo "suite=$SUITE uid=$SANDBOX_UID"
		cat "$SCRIPT" "$IMAGES_DIR/base/packages.txt"
	} | sha)
	ensure_ocitar
	build_base "$base_key"
	base_desc=$(ensure_layer base "$(echo "$base_key $OCITAR_HASH" | sha)" "$CACHE/rootfs/base")

	local stage
	stage="$WORK/executor"
	install -D -m 0755 -o 0 -g 0 "$exec_bin" "$stage$EXECUTOR_PATH"
	exec_key=$(cat "$exec_bin" <(echo "$OCITAR_HASH $EXECUTOR_PATH") | sha)
	# Fixed mtime: the executor layer's digest depends only on the binary.
	exec_desc=$(ensure_layer executor "$exec_key" -mtime 0 "$stage")

	ensure_image base "$base_desc" "$exec_desc"
	for t in "${templates[@]}"; do
		local tkey
		tkey=$({
			echo "$base_key template=$t"
			cat "$IMAGES_DIR/templates/$t/packages.txt"
		} | sha)
		build_template "$t" "$tkey"
		tdesc=$(ensure_layer "$t" "$(echo "$tkey $OCITAR_HASH" | sha)" -overlay "$CACHE/rootfs/$t")
		ensure_image "$t" "$base_desc" "$tdesc" "$exec_desc"
	done
	log "all done in $(since "$start"); compressed size (containerd) and unpacked size:"
	local images
	images=$(ctr -a "$ADDR" -n "$NS" images ls)
	for t in base "${templates[@]}"; do
		local du="$CACHE/rootfs/base"
		[[ $t == base ]] || du+=" $CACHE/rootfs/$t"
		# shellcheck disable=SC2086 # two paths
		log "  $PREFIX$t:latest $(awk -v r="$PREFIX$t:latest" '$1 == r { print substr($3, 8, 12), $4, $5 }' <<<"$images"), unpacked $(du -sch $du | awk 'END { print $1 }')"
	done
	[[ -z ${PUSH:-} ]] || push_images "$PUSH" base "${templates[@]}"
}

# push_images REGISTRY IMAGE...: tags localhost/sandbox/IMAGE:latest as
# REGISTRY/sandbox/IMAGE:latest in containerd and pushes it there.
push_images() {
	local reg=$1 t plain=()
	shift
	case $reg in
	localhost:* | 127.* | "[::1]":*) plain=(--plain-http) ;;
	esac
	[[ ${PUSH_PLAIN_HTTP:-} == 1 ]] && plain=(--plain-http)
	for t in "$@"; do
		local src="$PREFIX$t:latest" dst="$reg/sandbox/$t:latest" begin
		begin=$(now)
		ctr -a "$ADDR" -n "$NS" images tag --force "$src" "$dst" >/dev/null
		ctr -a "$ADDR" -n "$NS" images push "${plain[@]}" "$dst" >"$WORK/push-$t.log" 2>&1 ||
			die "push $dst failed: $(tail -3 "$WORK/push-$t.log")"
		log "pushed $dst in $(since "$begin")"
	done
}

main "$@"
