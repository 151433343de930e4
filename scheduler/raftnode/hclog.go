package raftnode

import (
	"context"
	"io"
	"log/slog"

	"github.com/hashicorp/go-hclog"
)

// newHCLogger returns an hclog.Logger, as raft wants, whose output goes to
// logger: an intercept logger that writes nothing itself and hands every
// entry to a sink that re-emits it through slog.
func newHCLogger(logger *slog.Logger) hclog.Logger {
	level := hclog.Info
	switch ctx := context.Background(); {
	case logger.Enabled(ctx, slog.LevelDebug-4):
		level = hclog.Trace
	case logger.Enabled(ctx, slog.LevelDebug):
		level = hclog.Debug
	}
	l := hclog.NewInterceptLogger(&hclog.LoggerOptions{
		Name:   "raft",
		Level:  level,
		Output: io.Discard,
	})
	l.RegisterSink(slogSink{logger: logger})
	return l
}

// slogSink re-emits hclog entries through slog. hclog's arguments are
// alternating keys and values, which slog accepts as they are.
type slogSink struct {
	logger *slog.Logger
}

func (s slogSink) Accept(name string, level hclog.Level, msg string, args ...any) {
	var l slog.Level
	switch level {
	case hclog.Trace:
		l = slog.LevelDebug - 4
	case hclog.Debug:
		l = slog.LevelDebug
	case hclog.Warn:
		l = slog.LevelWarn
	case hclog.Error:
		l = slog.LevelError
	default:
		l = slog.LevelInfo
	}
	ctx := context.Background()
	if !s.logger.Enabled(ctx, l) {
		return
	}
	s.logger.Log(ctx, l, msg, append([]any{"component", name}, args...)...)
}
