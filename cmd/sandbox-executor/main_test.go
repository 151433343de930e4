package main

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
)

// TestTuneRuntime runs this test binary again as a helper that calls
// tuneRuntime: it re-executes itself once with GOMAXPROCS=1, unless the
// environment sets GOMAXPROCS, and turns the memory profiler off.
func TestTuneRuntime(t *testing.T) {
	if os.Getenv("SANDBOX_TUNE_HELPER") == "1" {
		tuneRuntime(os.Getenv)
		fmt.Printf("gomaxprocs=%d memprofilerate=%d\n", runtime.GOMAXPROCS(0), runtime.MemProfileRate)
		os.Exit(0)
	}
	cases := []struct {
		name string
		env  []string
		want string
	}{
		{"default", nil, "gomaxprocs=1 memprofilerate=0"},
		{"explicit", []string{"GOMAXPROCS=3"}, "gomaxprocs=3 memprofilerate=0"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run=^TestTuneRuntime$")
			for _, e := range os.Environ() {
				if !strings.HasPrefix(e, "GOMAXPROCS=") {
					cmd.Env = append(cmd.Env, e)
				}
			}
			cmd.Env = append(append(cmd.Env, "SANDBOX_TUNE_HELPER=1"), c.env...)
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("helper: %v: %s", err, out)
			}
			if got := strings.TrimSpace(string(out)); got != c.want {
				t.Errorf("helper printed %q, want %q", got, c.want)
			}
		})
	}
}
