package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"

	"connectrpc.com/connect"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/executor/executorapi"
)

// maxExecutorResponseBytes bounds what the agent reads from an executor's answer.
const maxExecutorResponseBytes = 1 << 20

// executorClient talks to one container's executor over its unix socket,
// or over TCP where the runtime gives an endpoint.
type executorClient struct {
	sessionID string
	// network is "unix" or "tcp"; socket is the unix socket's path or the
	// TCP endpoint.
	network   string
	socket    string
	token     string
	transport *http.Transport
	client    *http.Client
}

func newExecutorClient(sessionID, socket, token string) *executorClient {
	return newExecutorClientOn(sessionID, "unix", socket, token)
}

// newTCPExecutorClient is the client of an executor at the TCP endpoint
// its runtime reported (runtime.Status.Endpoint; Kubernetes: the Pod's IP).
func newTCPExecutorClient(sessionID, endpoint, token string) *executorClient {
	return newExecutorClientOn(sessionID, "tcp", endpoint, token)
}

func newExecutorClientOn(sessionID, network, socket, token string) *executorClient {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, socket)
		},
		MaxIdleConnsPerHost: 4,
		DisableCompression:  true,
	}
	return &executorClient{sessionID: sessionID, network: network, socket: socket, token: token, transport: tr, client: &http.Client{Transport: tr}}
}

// forSession is a client of the same executor, over the same connections,
// that speaks for a session with its token (a claimed warm container's
// executor is already connected from its health checks).
func (c *executorClient) forSession(sessionID, token string) *executorClient {
	return &executorClient{sessionID: sessionID, network: c.network, socket: c.socket, token: token, transport: c.transport, client: c.client}
}

// present reports whether the executor's socket may be dialled: a unix
// socket must exist first (dialling a missing one costs a failed call);
// a TCP endpoint is tried.
func (c *executorClient) present() bool {
	if c.network != "unix" {
		return true
	}
	_, err := os.Stat(c.socket)
	return err == nil
}

// close drops the client's idle connections.
func (c *executorClient) close() { c.transport.CloseIdleConnections() }

// executorError is a non-2xx answer of an executor.
type executorError struct {
	sessionID string
	op        string
	status    int
	message   string
}

func (e *executorError) Error() string {
	return fmt.Sprintf("executor of session %s: %s: %d %s: %s", e.sessionID, e.op, e.status, http.StatusText(e.status), e.message)
}

// code maps the executor's HTTP status to the Connect code the agent answers with.
func (e *executorError) code() connect.Code {
	switch s := e.status; {
	case s == http.StatusBadRequest || s == http.StatusUnprocessableEntity:
		return connect.CodeInvalidArgument
	case s == http.StatusNotFound:
		return connect.CodeNotFound
	case s == http.StatusConflict || s == http.StatusPreconditionFailed:
		// The executor answers 409 when its state forbids the call (not, or already, initialised).
		return connect.CodeFailedPrecondition
	case s == http.StatusRequestEntityTooLarge || s == http.StatusTooManyRequests:
		return connect.CodeResourceExhausted
	case s == http.StatusServiceUnavailable:
		return connect.CodeUnavailable
	case s == http.StatusGatewayTimeout:
		return connect.CodeDeadlineExceeded
	default:
		// 401/403 mean the agent and its executor disagree on the token: our fault, not the caller's.
		return connect.CodeInternal
	}
}

// health asks GET /health.
func (c *executorClient) health(ctx context.Context) (executorapi.Health, error) {
	var h executorapi.Health
	err := c.do(ctx, "health", http.MethodGet, "/health", nil, false, &h)
	return h, err
}

// init hands the executor its session.
func (c *executorClient) init(ctx context.Context, req executorapi.InitRequest) error {
	return c.do(ctx, "init", http.MethodPost, "/init", req, false, nil)
}

func (c *executorClient) execute(ctx context.Context, req executorapi.ExecuteRequest) error {
	return c.do(ctx, "execute "+req.ExecutionID, http.MethodPost, "/execute", req, true, nil)
}

func (c *executorClient) cancel(ctx context.Context, executionID string) error {
	return c.do(ctx, "cancel "+executionID, http.MethodPost, "/executions/"+url.PathEscape(executionID)+"/cancel", nil, true, nil)
}

func (c *executorClient) do(ctx context.Context, op, method, path string, in any, auth bool, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("executor of session %s: %s: %w", c.sessionID, op, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://executor"+path, body)
	if err != nil {
		return fmt.Errorf("executor of session %s: %s: %w", c.sessionID, op, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if auth {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.client.Do(req)
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			return fmt.Errorf("executor of session %s: %s: %w", c.sessionID, op, ctxErr)
		}
		return fmt.Errorf("%w: executor of session %s is unreachable on %s: %s: %v", sandbox.ErrUnavailable, c.sessionID, c.socket, op, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxExecutorResponseBytes))
	if err != nil {
		return fmt.Errorf("%w: executor of session %s: %s: read answer: %v", sandbox.ErrUnavailable, c.sessionID, op, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		msg := strings.TrimSpace(string(b))
		var e executorapi.Error
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			msg = e.Error
		}
		return &executorError{sessionID: c.sessionID, op: op, status: resp.StatusCode, message: msg}
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("executor of session %s: %s: decode answer: %w", c.sessionID, op, err)
		}
	}
	return nil
}

// isExecutorError reports whether err is an executor's non-2xx answer.
func isExecutorError(err error) (*executorError, bool) {
	var e *executorError
	ok := errors.As(err, &e)
	return e, ok
}
