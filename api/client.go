package api

import (
	"context"
	"net/http"

	"connectrpc.com/connect"
)

// NewH2CClient returns an HTTP client that speaks cleartext HTTP/2 to http://
// addresses, as the internal services and gRPC need.
func NewH2CClient() *http.Client {
	p := new(http.Protocols)
	p.SetUnencryptedHTTP2(true)
	p.SetHTTP2(true)
	return &http.Client{Transport: &http.Transport{Protocols: p, ForceAttemptHTTP2: true, MaxIdleConnsPerHost: 64}}
}

// WithBearer is a client option that sends "Authorization: Bearer token" on every call.
func WithBearer(token string) connect.ClientOption {
	return connect.WithInterceptors(bearerInterceptor(token))
}

type bearerInterceptor string

func (b bearerInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		req.Header().Set("Authorization", "Bearer "+string(b))
		return next(ctx, req)
	}
}

func (b bearerInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		conn.RequestHeader().Set("Authorization", "Bearer "+string(b))
		return conn
	}
}

func (b bearerInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}
