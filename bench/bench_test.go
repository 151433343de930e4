package main

import (
	"context"
	"testing"
	"time"
)

func TestSummarize(t *testing.T) {
	var d []time.Duration
	for i := 100; i >= 1; i-- {
		d = append(d, time.Duration(i)*time.Millisecond)
	}
	r := summarize("x", d)
	if r.Count != 100 || r.P50 != 50 || r.P90 != 90 || r.P99 != 99 || r.Max != 100 {
		t.Fatalf("%+v", r)
	}
	if r := summarize("empty", nil); r.Count != 0 || r.P99 != 0 {
		t.Fatalf("%+v", r)
	}
}

// TestPlacementScenario smokes the placement scenario at a small size: it
// asserts only that placements happened and that none overcommitted.
func TestPlacementScenario(t *testing.T) {
	res, err := runPlacement(context.Background(), PlacementConfig{Agents: 100, Concurrency: 16, Duration: 2 * time.Second, Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if res.Latency.Count == 0 || res.Overcommitted != 0 || res.Errors != 0 {
		t.Fatalf("placement scenario: %+v", res)
	}
}
