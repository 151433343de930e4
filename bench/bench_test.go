package main

import (
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
