package api

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
)

// NewObserveInterceptor counts and times every call by method and code, and
// logs failed ones. It goes outside authentication, so refused calls count too.
func NewObserveInterceptor(reg prometheus.Registerer, logger *slog.Logger) connect.Interceptor {
	o := &observeInterceptor{
		logger: logger,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sandbox_api_requests_total",
			Help: "Public API calls by method and Connect code.",
		}, []string{"method", "code"}),
		seconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "sandbox_api_request_duration_seconds",
			Help:    "Public API call latency by method.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60},
		}, []string{"method"}),
	}
	reg.MustRegister(o.requests, o.seconds)
	return o
}

type observeInterceptor struct {
	logger   *slog.Logger
	requests *prometheus.CounterVec
	seconds  *prometheus.HistogramVec
}

func (o *observeInterceptor) done(ctx context.Context, procedure string, start time.Time, err error) {
	method := procedure[strings.LastIndex(procedure, "/")+1:]
	code := "ok"
	if err != nil {
		code = connect.CodeOf(err).String()
	}
	o.requests.WithLabelValues(method, code).Inc()
	o.seconds.WithLabelValues(method).Observe(time.Since(start).Seconds())
	if err != nil {
		level := slog.LevelDebug
		var ce *connect.Error
		if errors.As(err, &ce) && (ce.Code() == connect.CodeInternal || ce.Code() == connect.CodeUnknown) {
			level = slog.LevelError
		}
		o.logger.Log(ctx, level, "api call failed", "method", method, "code", code, "err", err)
	}
}

func (o *observeInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		start := time.Now()
		resp, err := next(ctx, req)
		o.done(ctx, req.Spec().Procedure, start, err)
		return resp, err
	}
}

func (o *observeInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (o *observeInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		start := time.Now()
		err := next(ctx, conn)
		o.done(ctx, conn.Spec().Procedure, start, err)
		return err
	}
}
