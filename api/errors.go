package api

import (
	"context"
	"errors"
	"strings"

	"connectrpc.com/connect"

	"github.com/sandboxhq/sandbox"
)

// Code maps a domain error to its Connect code; CodeUnknown when err wraps
// no domain error.
func Code(err error) connect.Code {
	var ce *connect.Error
	switch {
	case errors.As(err, &ce):
		return ce.Code()
	case errors.Is(err, sandbox.ErrInvalidArgument):
		return connect.CodeInvalidArgument
	case errors.Is(err, sandbox.ErrNotFound):
		return connect.CodeNotFound
	case errors.Is(err, sandbox.ErrAlreadyExists):
		return connect.CodeAlreadyExists
	case errors.Is(err, sandbox.ErrFailedPrecondition):
		return connect.CodeFailedPrecondition
	case errors.Is(err, sandbox.ErrResourceExhausted):
		return connect.CodeResourceExhausted
	case errors.Is(err, sandbox.ErrUnauthenticated):
		return connect.CodeUnauthenticated
	case errors.Is(err, sandbox.ErrPermissionDenied):
		return connect.CodePermissionDenied
	case errors.Is(err, sandbox.ErrUnavailable):
		return connect.CodeUnavailable
	case errors.Is(err, context.Canceled):
		return connect.CodeCanceled
	case errors.Is(err, context.DeadlineExceeded):
		return connect.CodeDeadlineExceeded
	}
	return connect.CodeUnknown
}

// Error turns a backend error into a Connect error with the same message.
// Errors that map to no domain error are reported as internal without their
// details, which may name hosts or files.
func Error(err error) error {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		return err
	}
	code := Code(err)
	if code == connect.CodeUnknown {
		return connect.NewError(connect.CodeInternal, errors.New("internal error; see the server log"))
	}
	// The code already says what the sentinel's text says ("not found",
	// "unavailable"): keep the message to the part that names what was wrong.
	msg := err.Error()
	for _, sentinel := range sentinels {
		if errors.Is(err, sentinel) {
			msg = strings.TrimPrefix(msg, sentinel.Error()+": ")
			break
		}
	}
	return connect.NewError(code, errors.New(msg))
}

var sentinels = []error{
	sandbox.ErrInvalidArgument, sandbox.ErrNotFound, sandbox.ErrAlreadyExists, sandbox.ErrFailedPrecondition,
	sandbox.ErrResourceExhausted, sandbox.ErrUnauthenticated, sandbox.ErrPermissionDenied, sandbox.ErrUnavailable,
}
