package agent

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"net/http"
	"strings"

	"connectrpc.com/connect"
)

// bearerMatcher compares Authorization headers against one token in constant
// time: both sides are hashed first, so neither content nor length leaks.
type bearerMatcher struct {
	want [sha256.Size]byte
}

func newBearerMatcher(token string) bearerMatcher {
	return bearerMatcher{want: sha256.Sum256([]byte(token))}
}

// match reports whether header is "Bearer <token>".
func (m bearerMatcher) match(header string) bool {
	got, ok := strings.CutPrefix(header, "Bearer ")
	if !ok {
		// Still hash something so a missing header costs the same.
		got = "\x00" + header
	}
	sum := sha256.Sum256([]byte(got))
	return subtle.ConstantTimeCompare(sum[:], m.want[:]) == 1 && ok
}

// clusterAuth is the AgentService interceptor: every call needs the cluster token.
type clusterAuth struct {
	m bearerMatcher
}

var errUnauthenticated = errors.New("agent: missing or wrong cluster token (Authorization: Bearer <cluster token>)")

func (a *clusterAuth) check(h http.Header) error {
	if !a.m.match(h.Get("Authorization")) {
		return connect.NewError(connect.CodeUnauthenticated, errUnauthenticated)
	}
	return nil
}

func (a *clusterAuth) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if !req.Spec().IsClient {
			if err := a.check(req.Header()); err != nil {
				return nil, err
			}
		}
		return next(ctx, req)
	}
}

func (a *clusterAuth) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (a *clusterAuth) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		if err := a.check(conn.RequestHeader()); err != nil {
			return err
		}
		return next(ctx, conn)
	}
}

// bearerToken is the client interceptor that puts the cluster token on every
// ControlPlaneService call.
type bearerToken string

func (t bearerToken) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if req.Spec().IsClient {
			req.Header().Set("Authorization", "Bearer "+string(t))
		}
		return next(ctx, req)
	}
}

func (t bearerToken) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		conn.RequestHeader().Set("Authorization", "Bearer "+string(t))
		return conn
	}
}

func (t bearerToken) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}
