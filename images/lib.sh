# shellcheck shell=bash
# images/lib.sh: Debian mirror discovery shared by images/build.sh and
# images/docker-build.sh (sourced, not run). The caller defines SUITE (e.g.
# bookworm) and die MESSAGE. find_mirrors sets MIRROR and SECURITY_MIRROR;
# apt_sources_list prints the sources.list every image gets.
#
# Nothing here changes what goes into an image except through the mirror
# URLs, which build.sh deliberately leaves out of its cache keys; so this file
# is not part of them either.

# debian_sources prints "URI SUITE" for every enabled deb source of the host,
# from one-line (.list) and deb822 (.sources) files.
debian_sources() {
	local f
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[[ -f $f ]] || continue
		sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" | awk '$1 == "deb" && NF >= 3 { print $2, $3 }'
	done
	for f in /etc/apt/sources.list.d/*.sources; do
		[[ -f $f ]] || continue
		awk 'BEGIN { RS = ""; FS = "\n" }
		{
			types = ""; uris = ""; suites = ""; enabled = "yes"
			for (i = 1; i <= NF; i++) {
				line = $i
				if (line ~ /^#/) continue
				split(line, kv, ":")
				key = tolower(kv[1]); val = substr(line, length(kv[1]) + 2)
				gsub(/^[ \t]+|[ \t]+$/, "", val)
				if (key == "types") types = val
				else if (key == "uris") uris = val
				else if (key == "suites") suites = val
				else if (key == "enabled") enabled = tolower(val)
			}
			if (enabled == "no" || types !~ /(^| )deb( |$)/) next
			nu = split(uris, u, /[ \t]+/); ns = split(suites, s, /[ \t]+/)
			for (a = 1; a <= nu; a++) for (b = 1; b <= ns; b++) print u[a], s[b]
		}' "$f"
	done
}

find_mirrors() {
	local sources
	sources=$(debian_sources)
	MIRROR=${DEBIAN_MIRROR:-$(awk -v s="$SUITE" '$2 == s && $1 !~ /security/ { print $1; exit }' <<<"$sources")}
	SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-$(awk -v s="$SUITE-security" '$2 == s { print $1; exit }' <<<"$sources")}
	[[ -n $MIRROR ]] || die "no Debian $SUITE mirror in /etc/apt/sources.list or /etc/apt/sources.list.d/*.sources; set DEBIAN_MIRROR=http://deb.debian.org/debian"
	MIRROR=${MIRROR%/}
	SECURITY_MIRROR=${SECURITY_MIRROR%/}
}

# apt_sources_list prints the one-line sources.list of an image: the main,
# updates and (if there is one) security suites from the mirrors above.
apt_sources_list() {
	echo "deb $MIRROR $SUITE main"
	echo "deb $MIRROR $SUITE-updates main"
	[[ -z $SECURITY_MIRROR ]] || echo "deb $SECURITY_MIRROR $SUITE-security main"
}
