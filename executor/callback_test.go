package executor

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sandboxhq/sandbox/executor/executorapi"
)

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func TestCallbackRetries(t *testing.T) {
	cases := []struct {
		name     string
		statuses []int // answers in order; the last repeats
		wantErr  bool
		attempts int32
	}{
		{name: "ok", statuses: []int{200}, attempts: 1},
		{name: "transient 503 then ok", statuses: []int{503, 503, 200}, attempts: 3},
		{name: "429 is retried", statuses: []int{429, 200}, attempts: 2},
		{name: "400 is permanent", statuses: []int{400}, wantErr: true, attempts: 1},
		{name: "401 is permanent", statuses: []int{401}, wantErr: true, attempts: 1},
		{name: "budget runs out", statuses: []int{503}, wantErr: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var n atomic.Int32
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				i := int(n.Add(1)) - 1
				if r.Header.Get("Authorization") != "Bearer tok" {
					t.Errorf("authorization %q", r.Header.Get("Authorization"))
				}
				w.WriteHeader(tc.statuses[min(i, len(tc.statuses)-1)])
			}))
			defer srv.Close()
			cp, err := newControlPlane(srv.URL, time.Second, func() string { return "tok" }, quietLog())
			if err != nil {
				t.Fatal(err)
			}
			err = cp.Result(context.Background(), "e-1", executorapi.Result{State: executorapi.StateCompleted})
			if (err != nil) != tc.wantErr {
				t.Fatalf("err %v, want error %v", err, tc.wantErr)
			}
			if tc.attempts > 0 && n.Load() != tc.attempts {
				t.Errorf("%d attempts, want %d", n.Load(), tc.attempts)
			}
		})
	}
}

func TestCallbackOverUnixSocket(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "agent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 4)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got <- r.Method + " " + r.URL.RequestURI() + " " + r.Header.Get("X-Content-Sha256") + " " + string(b)
	})}
	go srv.Serve(ln)
	defer srv.Close()

	cp, err := newControlPlane("unix://"+sock, time.Second, func() string { return "tok" }, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "f")
	if err := os.WriteFile(p, []byte("bytes"), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sum, _ := hashFile(f, 5)
	if err := cp.UploadArtifact(context.Background(), "e-1", "a b/c.txt", f, 5, sum); err != nil {
		t.Fatal(err)
	}
	if want := "PUT /internal/executions/e-1/artifacts?path=a+b%2Fc.txt " + sum + " bytes"; <-got != want {
		t.Errorf("want %q", want)
	}
	if err := cp.Heartbeat(context.Background(), "e-1", time.Second); err != nil {
		t.Fatal(err)
	}
	if g := <-got; g != "POST /internal/executions/e-1/heartbeat  " {
		t.Errorf("heartbeat arrived as %q", g)
	}
}

func TestUploadOfChangedFileIsNotRetried(t *testing.T) {
	var n atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.Add(1)
		io.Copy(io.Discard, r.Body)
	}))
	defer srv.Close()
	cp, _ := newControlPlane(srv.URL, 5*time.Second, func() string { return "tok" }, quietLog())
	p := filepath.Join(t.TempDir(), "f")
	os.WriteFile(p, []byte("hello"), 0o644)
	f, _ := os.Open(p)
	defer f.Close()
	err := cp.UploadArtifact(context.Background(), "e-1", "f", f, 5, "0000")
	if !errors.Is(err, errChangedWhileUploading) {
		t.Fatalf("err %v, want errChangedWhileUploading", err)
	}
	if n.Load() > 1 {
		t.Errorf("%d attempts, want at most 1", n.Load())
	}
}
