package state

import (
	"path/filepath"
	"reflect"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

func openT(t *testing.T, path string) *Store {
	t.Helper()
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestSessionsSurviveReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.db")
	s := openT(t, path)
	now := time.Now().UTC().Truncate(time.Second)
	recs := []Session{
		{SessionID: "b", ContainerID: "s-b", TemplateID: "python-basic", Image: "img", Token: "tok-b", CreatedAt: now},
		{SessionID: "a", ContainerID: "s-a", TemplateID: "nodejs-basic", Image: "img", Token: "tok-a", SocketDir: "/d/sockets/s-a",
			Limits: Limits{CPUMillis: 500, MemoryMiB: 256, Pids: 64, DiskMiB: 100, MaxExecutionTimeoutSeconds: 30}, CreatedAt: now},
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

	s = openT(t, path)
	t.Cleanup(func() { s.Close() })
	got, err := s.Sessions()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || !reflect.DeepEqual(got[0], recs[1]) {
		t.Fatalf("Sessions = %+v, want [%+v]", got, recs[1])
	}
}

func TestPendingExecutions(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.db")
	s := openT(t, path)
	if err := s.PutSession(Session{SessionID: "a", ContainerID: "s-a", Token: "t"}); err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		add, remove string
		want        []string
	}{
		{add: "e2", want: []string{"e2"}},
		{add: "e1", want: []string{"e1", "e2"}},
		{add: "e2", want: []string{"e1", "e2"}}, // again: no change
		{remove: "e3", want: []string{"e1", "e2"}},
		{remove: "e2", want: []string{"e1"}},
		{remove: "e1", want: nil},
	}
	for i, st := range steps {
		var err error
		if st.add != "" {
			err = s.AddPending("a", st.add)
		} else {
			err = s.RemovePending("a", st.remove)
		}
		if err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		recs, err := s.Sessions()
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(recs[0].PendingExecutionIDs, st.want) {
			t.Fatalf("step %d: pending = %v, want %v", i, recs[0].PendingExecutionIDs, st.want)
		}
	}
	if err := s.AddPending("nope", "e1"); err == nil {
		t.Error("AddPending to an unknown session succeeded")
	}
	if err := s.RemovePending("nope", "e1"); err != nil {
		t.Errorf("RemovePending from an unknown session: %v", err)
	}

	if err := s.AddPending("a", "e9"); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s = openT(t, path)
	t.Cleanup(func() { s.Close() })
	recs, _ := s.Sessions()
	if len(recs) != 1 || !reflect.DeepEqual(recs[0].PendingExecutionIDs, []string{"e9"}) {
		t.Fatalf("after reopen: %+v", recs)
	}
}

func TestFenceTerm(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.db")
	s := openT(t, path)
	if term, err := s.FenceTerm(); err != nil || term != 0 {
		t.Fatalf("fresh FenceTerm = %d, %v", term, err)
	}
	for _, tc := range []struct{ raise, want uint64 }{{3, 3}, {5, 5}, {4, 5}, {0, 5}, {5, 5}} {
		got, err := s.RaiseFenceTerm(tc.raise)
		if err != nil || got != tc.want {
			t.Fatalf("RaiseFenceTerm(%d) = %d, %v; want %d", tc.raise, got, err, tc.want)
		}
	}
	s.Close()
	s = openT(t, path)
	t.Cleanup(func() { s.Close() })
	if term, err := s.FenceTerm(); err != nil || term != 5 {
		t.Fatalf("FenceTerm after reopen = %d, %v; want 5", term, err)
	}
}

// TestMigrateV1 opens a file written in the v1 layout.
func TestMigrateV1(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.db")
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	v1rec := `{"session_id":"a","container_id":"s-a","template_id":"python-basic","image":"img","token":"tok-a","created_at":"2025-01-02T03:04:05Z"}`
	err = db.Update(func(tx *bolt.Tx) error {
		v1, _ := tx.CreateBucket([]byte("v1"))
		meta, _ := v1.CreateBucket([]byte("meta"))
		if err := meta.Put([]byte("schema"), []byte("1")); err != nil {
			return err
		}
		sess, _ := v1.CreateBucket([]byte("sessions"))
		return sess.Put([]byte("a"), []byte(v1rec))
	})
	if err != nil {
		t.Fatal(err)
	}
	db.Close()

	s := openT(t, path)
	recs, err := s.Sessions()
	if err != nil {
		t.Fatal(err)
	}
	want := Session{SessionID: "a", ContainerID: "s-a", TemplateID: "python-basic", Image: "img", Token: "tok-a",
		CreatedAt: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)}
	if len(recs) != 1 || !reflect.DeepEqual(recs[0], want) {
		t.Fatalf("migrated = %+v, want %+v", recs, want)
	}
	s.Close()
	db, err = bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	_ = db.View(func(tx *bolt.Tx) error {
		if tx.Bucket([]byte("v1")) != nil {
			t.Error("v1 bucket still there after migration")
		}
		if got := string(tx.Bucket([]byte("v2")).Bucket([]byte("meta")).Get([]byte("schema"))); got != "2" {
			t.Errorf("schema = %q", got)
		}
		return nil
	})
}
