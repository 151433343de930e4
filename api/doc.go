// Package api serves the public sandbox.v1 API: thin Connect handlers that
// turn requests into calls on a Backend (the scheduler) and results back into
// responses, the interceptors every call passes (authentication, metrics,
// logging), and the one place where domain errors become Connect codes.
//
// The generated code lives in api/gen; proto/ holds its source.
package api
