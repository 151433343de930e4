// Package images builds the sandbox template images: images/build.sh makes
// them without a registry or Docker (debootstrap, chroot apt-get, the ocitar
// packer in images/ocitar) and imports them into containerd; the Dockerfiles
// make the same images for operators with a registry. See README.md.
//
// The package itself holds only the names the build and its test share; its
// test checks the images that build.sh imported.
package images

// Namespace is the containerd namespace the images are imported into.
const Namespace = "sandbox"

// BaseImage is the image every template image is built on.
const BaseImage = "localhost/sandbox/base:latest"

// Settings every image's config carries (images/build.sh and the Dockerfiles).
const (
	ExecutorPath = "/usr/local/bin/sandbox-executor"
	User         = "1000:1000"
	WorkingDir   = "/workspace"
)
