package scheduler

import (
	"errors"
	"testing"

	"github.com/sandboxhq/sandbox"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
)

func TestPickAgent(t *testing.T) {
	agent := func(id string, cpu int32, mem int64) *statev1.Agent {
		return &statev1.Agent{Id: id, CpuMillis: cpu, MemoryMib: mem}
	}
	req := sandbox.Limits{CPUMillis: 1000, MemoryMiB: 512}
	cases := []struct {
		name    string
		cands   []candidate
		want    string
		wantErr error
	}{
		{"no agents", nil, "", sandbox.ErrUnavailable},
		{"one that fits", []candidate{{agent: agent("a", 2000, 1024)}}, "a", nil},
		{"exactly full fits", []candidate{{agent: agent("a", 1000, 512)}}, "a", nil},
		{"never over capacity", []candidate{{agent: agent("a", 2000, 1024), cpuUsed: 1500}}, "", sandbox.ErrResourceExhausted},
		{"memory counts too", []candidate{{agent: agent("a", 8000, 1024), memoryUse: 600}}, "", sandbox.ErrResourceExhausted},
		{"best fit: least memory left", []candidate{
			{agent: agent("big", 8000, 8192)},
			{agent: agent("small", 8000, 1024)},
		}, "small", nil},
		{"a warm container wins over a better fit", []candidate{
			{agent: agent("small", 8000, 1024)},
			{agent: agent("big-warm", 8000, 8192), warm: 2},
		}, "big-warm", nil},
		{"warm but full loses", []candidate{
			{agent: agent("full-warm", 8000, 1024), memoryUse: 1024, warm: 3},
			{agent: agent("free", 8000, 8192)},
		}, "free", nil},
		{"skips the full one", []candidate{
			{agent: agent("full", 8000, 1024), memoryUse: 1024},
			{agent: agent("free", 8000, 8192)},
		}, "free", nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := pickAgent(c.cands, req)
			if c.wantErr != nil {
				if !errors.Is(err, c.wantErr) {
					t.Fatalf("err %v, want %v", err, c.wantErr)
				}
				return
			}
			if err != nil || got.GetId() != c.want {
				t.Fatalf("got %v %v, want %s", got.GetId(), err, c.want)
			}
		})
	}
}

func TestPaginate(t *testing.T) {
	all := []int{1, 2, 3, 4, 5}
	page, next, err := paginate(all, 2, "")
	if err != nil || len(page) != 2 || next == "" {
		t.Fatalf("%v %q %v", page, next, err)
	}
	page, next, err = paginate(all, 2, next)
	if err != nil || page[0] != 3 || next == "" {
		t.Fatalf("%v %q %v", page, next, err)
	}
	page, next, err = paginate(all, 2, next)
	if err != nil || len(page) != 1 || next != "" {
		t.Fatalf("%v %q %v", page, next, err)
	}
	if _, _, err := paginate(all, 2, "garbage!"); !errors.Is(err, sandbox.ErrInvalidArgument) {
		t.Fatalf("bad token: %v", err)
	}
	if _, _, err := paginate(all, -1, ""); !errors.Is(err, sandbox.ErrInvalidArgument) {
		t.Fatalf("negative size: %v", err)
	}
}
