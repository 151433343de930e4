// Package sandbox holds the platform's domain rules: session and execution
// states and their legal transitions, resource limits and how they are
// resolved against a template, the languages, the built-in templates, and the
// domain errors every component wraps.
//
// It imports no adapter, no protobuf and no runtime. The replicated records
// themselves are the sandbox.v1 protobuf messages (they are what the Raft log
// and the API carry); the enum values here share their numbers, so converting
// is a plain type conversion.
package sandbox

import "errors"

// Domain errors. Components wrap them with %w and the context a person needs
// (which session, which agent); only api/ turns them into Connect codes.
var (
	ErrInvalidArgument    = errors.New("invalid argument")
	ErrNotFound           = errors.New("not found")
	ErrAlreadyExists      = errors.New("already exists")
	ErrFailedPrecondition = errors.New("failed precondition")
	ErrResourceExhausted  = errors.New("resource exhausted")
	ErrUnauthenticated    = errors.New("unauthenticated")
	ErrPermissionDenied   = errors.New("permission denied")
	ErrUnavailable        = errors.New("unavailable")
)
