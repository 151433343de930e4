package state

import (
	"path/filepath"
	"testing"
	"time"
)

func TestSessionsSurviveReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC().Truncate(time.Second)
	recs := []Session{
		{SessionID: "b", ContainerID: "s-b", TemplateID: "python-basic", Image: "img", Token: "tok-b", CreatedAt: now},
		{SessionID: "a", ContainerID: "s-a", TemplateID: "nodejs-basic", Image: "img", Token: "tok-a", CreatedAt: now},
	}
	for _, r := range recs {
		if err := s.PutSession(r); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.DeleteSession("b"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSession("unknown"); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s, err = Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	got, err := s.Sessions()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0] != recs[1] {
		t.Fatalf("Sessions = %+v, want [%+v]", got, recs[1])
	}
}
