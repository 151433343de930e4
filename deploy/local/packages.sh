# Debian packages the platform needs on a host, shared by make up and .ci/run.
# command:package pairs; a package is missing when its command is.
SANDBOX_PACKAGES=(
	containerd:containerd
	runc:runc
	bwrap:bubblewrap
	debootstrap:debootstrap
	setpriv:util-linux
	ip:iproute2
	curl:curl
)

missing_packages() {
	local out=() pair
	for pair in "${SANDBOX_PACKAGES[@]}"; do
		command -v "${pair%%:*}" >/dev/null 2>&1 || out+=("${pair##*:}")
	done
	echo "${out[@]}"
}
