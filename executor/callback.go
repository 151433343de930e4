package executor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"time"

	"github.com/sandboxhq/sandbox/executor/executorapi"
)

// controlPlane sends an execution's callbacks to the agent (or whatever
// CONTROL_PLANE_URL names), always with the session's bearer token.
type controlPlane struct {
	base   string
	client *http.Client
	token  func() string
	// budget bounds the retries of one artifact upload or result.
	budget time.Duration
	log    *slog.Logger
}

// Per-attempt timeouts. An artifact is at most MaxArtifactBytes over a
// local socket, so minutes are plenty.
const (
	jsonAttemptTimeout     = 15 * time.Second
	artifactAttemptTimeout = 2 * time.Minute
	statusBudget           = 15 * time.Second
	firstBackoff           = 200 * time.Millisecond
	maxBackoff             = 5 * time.Second
)

func newControlPlane(rawURL string, budget time.Duration, token func() string, log *slog.Logger) (*controlPlane, error) {
	base, socket, err := parseControlPlaneURL(rawURL)
	if err != nil {
		return nil, err
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	if socket != "" {
		tr.Proxy = nil
		tr.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}
	}
	return &controlPlane{base: base, client: &http.Client{Transport: tr}, token: token, budget: budget, log: log}, nil
}

// statusError is a non-2xx answer.
type statusError struct {
	Code    int
	Message string
}

func (e *statusError) Error() string {
	return fmt.Sprintf("control plane answered %d: %s", e.Code, e.Message)
}

// retryable tells a transient failure (network, 5xx, 408, 429) from a
// permanent one (any other 4xx, or a file that changed under the upload).
func retryable(err error) bool {
	if errors.Is(err, errChangedWhileUploading) {
		return false
	}
	var se *statusError
	if errors.As(err, &se) {
		return se.Code >= 500 || se.Code == http.StatusRequestTimeout || se.Code == http.StatusTooManyRequests
	}
	return true
}

// request is one callback; body is called again for every attempt.
type request struct {
	method  string
	path    string
	query   url.Values
	header  http.Header
	body    func() (io.Reader, int64)
	timeout time.Duration
}

// once sends r a single time.
func (c *controlPlane) once(ctx context.Context, r request) error {
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	u := c.base + r.path
	if len(r.query) > 0 {
		u += "?" + r.query.Encode()
	}
	var body io.Reader
	var length int64
	if r.body != nil {
		body, length = r.body()
	}
	req, err := http.NewRequestWithContext(ctx, r.method, u, body)
	if err != nil {
		return fmt.Errorf("build %s %s: %w", r.method, r.path, err)
	}
	req.ContentLength = length
	if length == 0 {
		req.Body = http.NoBody
	}
	for k, v := range r.header {
		req.Header[k] = v
	}
	req.Header.Set("Authorization", "Bearer "+c.token())
	resp, err := c.client.Do(req)
	if vr, ok := body.(*verifyingReader); ok && vr.failed.Load() {
		if err == nil {
			resp.Body.Close()
		}
		return fmt.Errorf("%s %s: %w", r.method, r.path, errChangedWhileUploading)
	}
	if err != nil {
		return fmt.Errorf("%s %s: %w", r.method, r.path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 == 2 {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		return nil
	}
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	var e executorapi.Error
	if json.Unmarshal(msg, &e) == nil && e.Error != "" {
		msg = []byte(e.Error)
	}
	return &statusError{Code: resp.StatusCode, Message: string(bytes.TrimSpace(msg))}
}

// retry sends r until it succeeds, fails permanently, ctx ends or budget
// is spent, backing off exponentially between attempts.
func (c *controlPlane) retry(ctx context.Context, budget time.Duration, r request) error {
	deadline := time.Now().Add(budget)
	backoff := firstBackoff
	for attempt := 1; ; attempt++ {
		err := c.once(ctx, r)
		if err == nil || !retryable(err) {
			return err
		}
		if ctx.Err() != nil || time.Now().Add(backoff).After(deadline) {
			return fmt.Errorf("giving up after %d attempts: %w", attempt, err)
		}
		c.log.Debug("callback failed, retrying", "method", r.method, "path", r.path, "attempt", attempt, "backoff", backoff, "err", err)
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("giving up after %d attempts: %w", attempt, err)
		case <-t.C:
		}
		backoff = min(backoff*2, maxBackoff)
	}
}

func jsonBody(v any) (func() (io.Reader, int64), error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	return func() (io.Reader, int64) { return bytes.NewReader(b), int64(len(b)) }, nil
}

var jsonHeader = http.Header{"Content-Type": {"application/json"}}

func executionPath(id, what string) string {
	return "/internal/executions/" + url.PathEscape(id) + "/" + what
}

// Status reports a state change, retrying briefly: the result that follows
// carries the state that matters.
func (c *controlPlane) Status(ctx context.Context, id, state string) error {
	body, err := jsonBody(executorapi.StatusReport{State: state})
	if err != nil {
		return err
	}
	return c.retry(ctx, statusBudget, request{method: http.MethodPost, path: executionPath(id, "status"),
		header: jsonHeader, body: body, timeout: jsonAttemptTimeout})
}

// Heartbeat says the execution still runs; one attempt, best effort.
func (c *controlPlane) Heartbeat(ctx context.Context, id string, timeout time.Duration) error {
	return c.once(ctx, request{method: http.MethodPost, path: executionPath(id, "heartbeat"), timeout: timeout})
}

// UploadArtifact streams the first size bytes of f, announcing sha; an
// attempt whose bytes no longer match sha is aborted and not retried.
func (c *controlPlane) UploadArtifact(ctx context.Context, id, rel string, f *os.File, size int64, sha string) error {
	return c.retry(ctx, c.budget, request{
		method: http.MethodPut,
		path:   executionPath(id, "artifacts"),
		query:  url.Values{"path": {rel}},
		header: http.Header{"Content-Type": {"application/octet-stream"}, "X-Content-Sha256": {sha}},
		body: func() (io.Reader, int64) {
			return newVerifyingReader(f, size, sha), size
		},
		timeout: artifactAttemptTimeout,
	})
}

// Result delivers the terminal report.
func (c *controlPlane) Result(ctx context.Context, id string, res executorapi.Result) error {
	body, err := jsonBody(res)
	if err != nil {
		return err
	}
	return c.retry(ctx, c.budget, request{method: http.MethodPost, path: executionPath(id, "result"),
		header: jsonHeader, body: body, timeout: jsonAttemptTimeout})
}
