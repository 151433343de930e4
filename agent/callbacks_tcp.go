package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/sandboxhq/sandbox/executor/executorapi"
)

// Executors call back on the unix socket in their socket directory, where
// the socket says which session calls. Where the runtime runs containers
// elsewhere (Kubernetes: a Pod on some node), they call back over TCP on
// Config.CallbackListen instead, one listener for every session, and the
// token a request carries says which session it is for.

// controlPlaneURL is the CONTROL_PLANE_URL executors get.
func (a *Agent) controlPlaneURL() string {
	if a.cfg.CallbackURL != "" {
		return a.cfg.CallbackURL
	}
	return "unix://" + executorapi.SocketDir + "/" + executorapi.AgentSocket
}

// callbacksByToken serves the callbacks of every session: each request for
// the session whose token it carries (compared in constant time, session
// by session), then as on that session's socket.
func (a *Agent) callbacksByToken() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		auth := r.Header.Get("Authorization")
		var found *session
		a.mu.Lock()
		for _, s := range a.sessions {
			if s.auth.match(auth) {
				found = s
				break
			}
		}
		a.mu.Unlock()
		if found == nil {
			a.metrics.callbacks.WithLabelValues(kindUnknown, "401").Inc()
			writeError(w, http.StatusUnauthorized, "missing or unknown session token")
			return
		}
		a.callbacks.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), sessionKey{}, found)))
	})
}

// serveCallbacksTCP listens on Config.CallbackListen, when set, and serves
// callbacks there until the returned stop is called.
func (a *Agent) serveCallbacksTCP() (stop func(), err error) {
	if a.cfg.CallbackListen == "" {
		return func() {}, nil
	}
	ln, err := net.Listen("tcp", a.cfg.CallbackListen)
	if err != nil {
		return nil, fmt.Errorf("agent %s: listen for callbacks on %s: %w", a.cfg.ID, a.cfg.CallbackListen, err)
	}
	srv := &http.Server{
		Handler:           a.callbacksByToken(),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
	}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("callback server", "listen", a.cfg.CallbackListen, "err", err)
		}
	}()
	a.log.Info("serving executor callbacks over TCP", "listen", ln.Addr().String(), "url", a.cfg.CallbackURL)
	return func() { _ = srv.Close() }, nil
}
