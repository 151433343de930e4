package main

import (
	"context"
	"fmt"
	"runtime"
	"runtime/debug"
)

// version is set at link time: -ldflags "-X main.version=v1.2.3". Otherwise
// the module version and VCS revision from the build info are shown.
var version = ""

func (a *app) cmdVersion(_ context.Context, args []string) error {
	fs := a.newFlagSet("version")
	if _, err := a.parseLeaf(fs, args, "version", "Prints sandboxctl's version, VCS revision and Go version.", 0, 0); err != nil {
		return err
	}
	v, rev, dirty := version, "", false
	if info, ok := debug.ReadBuildInfo(); ok {
		if v == "" {
			v = info.Main.Version
		}
		for _, s := range info.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				dirty = s.Value == "true"
			}
		}
	}
	if v == "" {
		v = "(devel)"
	}
	line := "sandboxctl " + v
	if rev != "" {
		line += " " + rev
		if dirty {
			line += "-dirty"
		}
	}
	_, err := fmt.Fprintf(a.stdout, "%s %s %s/%s\n", line, runtime.Version(), runtime.GOOS, runtime.GOARCH)
	return err
}
