package docker_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"

	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/agent/runtime/docker"
	"github.com/sandboxhq/sandbox/agent/runtime/runtimetest"
	"github.com/sandboxhq/sandbox/internal/testenv"
)

const defaultTestImage = "localhost/sandbox/python-basic:latest"

// testImage is the image the suite runs: SANDBOX_TEST_IMAGE or python-basic
// as make images loads it into Docker.
func testImage() string {
	if img := os.Getenv("SANDBOX_TEST_IMAGE"); img != "" {
		return img
	}
	return defaultTestImage
}

// newRuntime connects to the test dockerd with its label files in stateDir
// and checks the test image is there.
func newRuntime(t testing.TB, stateDir string) *docker.Runtime {
	t.Helper()
	host := testenv.RequireDocker(t)
	rt, err := docker.New(context.Background(), docker.Config{Host: host, StateDir: stateDir})
	if err != nil {
		testenv.Unavailable(t, "%v", err)
	}
	t.Cleanup(func() { rt.Close() })
	if _, err := rt.Client().ImageInspect(context.Background(), testImage()); err != nil {
		testenv.Unavailable(t, "image %s is not in Docker: run make images with dockerd running (%v)", testImage(), err)
	}
	return rt
}

func TestConformance(t *testing.T) {
	state := t.TempDir()
	rt := newRuntime(t, state)
	// Registered first, so it runs last, after every case destroyed its
	// containers: no socket directory of the suite is still sealed (bound
	// onto itself). The directories are the cases' t.TempDir()s.
	before := sealedMounts(t.Name())
	t.Cleanup(func() {
		for _, m := range sealedMounts(t.Name()) {
			if !slices.Contains(before, m) {
				t.Errorf("socket directory %s still mounted after the suite", m)
			}
		}
	})
	runtimetest.Run(t, runtimetest.Harness{
		Runtime: rt,
		Image:   testImage(),
		CgroupLimits: func(ctx context.Context, id string) (runtimetest.CgroupLimits, error) {
			st, err := rt.Inspect(ctx, id)
			if err != nil {
				return runtimetest.CgroupLimits{}, err
			}
			path, err := runtimetest.CgroupPathOf(st.Pid)
			if err != nil {
				return runtimetest.CgroupLimits{}, err
			}
			return runtimetest.ReadCgroupLimits(path)
		},
		Leftovers:   func(ctx context.Context, id string) error { return leftovers(ctx, rt, state, id) },
		ExtraMounts: dockerMounts(),
		Reopen: func(t *testing.T) runtime.Runtime {
			return newRuntime(t, state)
		},
	})
}

// dockerMounts are the mount points Docker adds to every container: the
// files it generates for name resolution (read-only to uid 1000), and the
// container's cgroup tree (read-only) with one mount per v1 hierarchy.
func dockerMounts() []string {
	out := []string{"/etc/resolv.conf", "/etc/hostname", "/etc/hosts", "/sys/fs/cgroup"}
	entries, _ := os.ReadDir("/sys/fs/cgroup")
	for _, e := range entries {
		out = append(out, "/sys/fs/cgroup/"+e.Name())
	}
	return out
}

// sealedMounts lists the host's mount points below the temporary
// directories of test name.
func sealedMounts(name string) []string {
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	var out []string
	for line := range strings.Lines(string(mounts)) {
		if f := strings.Fields(line); len(f) > 4 && strings.Contains(f[4], "/"+name) {
			out = append(out, f[4])
		}
	}
	return out
}

// leftovers reports what Docker or the adapter still holds for id: the
// container and its label file (sealing mounts: see TestConformance).
func leftovers(ctx context.Context, rt *docker.Runtime, state, id string) error {
	var errs []error
	cs, err := rt.Client().ContainerList(ctx, container.ListOptions{All: true, Filters: filters.NewArgs(filters.Arg("name", "^/"+id+"$"))})
	if err != nil {
		errs = append(errs, err)
	}
	if len(cs) > 0 {
		errs = append(errs, fmt.Errorf("container %s still in Docker (%s)", id, cs[0].State))
	}
	if _, err := os.Stat(filepath.Join(state, id+".labels")); err == nil {
		errs = append(errs, fmt.Errorf("label file of %s still there", id))
	}
	return errors.Join(errs...)
}
