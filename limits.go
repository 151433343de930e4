package sandbox

import (
	"fmt"
	"time"
)

// Limits bounds what one session may use; it mirrors sandbox.v1.ResourceLimits.
type Limits struct {
	CPUMillis                  int32
	MemoryMiB                  int64
	Pids                       int32
	DiskMiB                    int64
	MaxExecutionTimeoutSeconds int32
}

// Defaults that apply when neither the request nor the template says otherwise.
const (
	DefaultIdleTimeout      = 5 * time.Minute
	MaxIdleTimeout          = 24 * time.Hour
	DefaultExecutionTimeout = 60 * time.Second
	// MaxCodeBytes bounds the code of one execution.
	MaxCodeBytes = 1 << 20
	// MaxEnvEntries and MaxEnvBytes bound a session's or an execution's env.
	MaxEnvEntries = 128
	MaxEnvBytes   = 64 << 10
)

// DefaultLimits are the limits of the built-in templates' sessions.
var DefaultLimits = Limits{CPUMillis: 1000, MemoryMiB: 512, Pids: 256, DiskMiB: 512, MaxExecutionTimeoutSeconds: 300}

// MaxLimits are the built-in templates' maximum limits.
var MaxLimits = Limits{CPUMillis: 2000, MemoryMiB: 4096, Pids: 4096, DiskMiB: 4096, MaxExecutionTimeoutSeconds: 3600}

// ResolveLimits fills the zero fields of req from def and checks every field
// against max. A negative field or one above max is ErrInvalidArgument.
func ResolveLimits(req, def, max Limits) (Limits, error) {
	out := req
	fields := []struct {
		name          string
		v             *int64
		def, max, min int64
	}{
		{"cpu_millis", nil, int64(def.CPUMillis), int64(max.CPUMillis), 10},
		{"memory_mib", nil, def.MemoryMiB, max.MemoryMiB, 16},
		{"pids", nil, int64(def.Pids), int64(max.Pids), 16},
		{"disk_mib", nil, def.DiskMiB, max.DiskMiB, 1},
		{"max_execution_timeout_seconds", nil, int64(def.MaxExecutionTimeoutSeconds), int64(max.MaxExecutionTimeoutSeconds), 1},
	}
	vals := []int64{int64(req.CPUMillis), req.MemoryMiB, int64(req.Pids), req.DiskMiB, int64(req.MaxExecutionTimeoutSeconds)}
	for i, f := range fields {
		v := vals[i]
		switch {
		case v < 0:
			return Limits{}, fmt.Errorf("%w: resource_limits.%s must not be negative, got %d", ErrInvalidArgument, f.name, v)
		case v == 0:
			v = f.def
		case v < f.min:
			return Limits{}, fmt.Errorf("%w: resource_limits.%s must be at least %d, got %d", ErrInvalidArgument, f.name, f.min, v)
		}
		if f.max > 0 && v > f.max {
			return Limits{}, fmt.Errorf("%w: resource_limits.%s %d exceeds the template's maximum %d", ErrInvalidArgument, f.name, v, f.max)
		}
		vals[i] = v
	}
	out.CPUMillis = int32(vals[0])
	out.MemoryMiB = vals[1]
	out.Pids = int32(vals[2])
	out.DiskMiB = vals[3]
	out.MaxExecutionTimeoutSeconds = int32(vals[4])
	return out, nil
}

// ResolveIdleTimeout applies the default to 0 and bounds the rest.
func ResolveIdleTimeout(seconds int32) (time.Duration, error) {
	switch {
	case seconds < 0:
		return 0, fmt.Errorf("%w: idle_timeout_seconds must not be negative, got %d", ErrInvalidArgument, seconds)
	case seconds == 0:
		return DefaultIdleTimeout, nil
	}
	d := time.Duration(seconds) * time.Second
	if d > MaxIdleTimeout {
		return 0, fmt.Errorf("%w: idle_timeout_seconds %d exceeds the maximum %d", ErrInvalidArgument, seconds, int(MaxIdleTimeout/time.Second))
	}
	return d, nil
}

// ResolveExecutionTimeout applies the default to 0 and checks the session's maximum.
func ResolveExecutionTimeout(seconds int32, l Limits) (time.Duration, error) {
	switch {
	case seconds < 0:
		return 0, fmt.Errorf("%w: timeout_seconds must not be negative, got %d", ErrInvalidArgument, seconds)
	case seconds == 0:
		d := DefaultExecutionTimeout
		if max := time.Duration(l.MaxExecutionTimeoutSeconds) * time.Second; max > 0 && d > max {
			d = max
		}
		return d, nil
	}
	if l.MaxExecutionTimeoutSeconds > 0 && seconds > l.MaxExecutionTimeoutSeconds {
		return 0, fmt.Errorf("%w: timeout_seconds %d exceeds the session's maximum %d", ErrInvalidArgument, seconds, l.MaxExecutionTimeoutSeconds)
	}
	return time.Duration(seconds) * time.Second, nil
}

// ValidateEnv checks an env map's size and names.
func ValidateEnv(field string, env map[string]string) error {
	if len(env) > MaxEnvEntries {
		return fmt.Errorf("%w: %s has %d entries, at most %d are allowed", ErrInvalidArgument, field, len(env), MaxEnvEntries)
	}
	size := 0
	for k, v := range env {
		if !validEnvName(k) {
			return fmt.Errorf("%w: %s name %q is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)", ErrInvalidArgument, field, k)
		}
		size += len(k) + len(v)
	}
	if size > MaxEnvBytes {
		return fmt.Errorf("%w: %s is %d bytes, at most %d are allowed", ErrInvalidArgument, field, size, MaxEnvBytes)
	}
	return nil
}

func validEnvName(s string) bool {
	if s == "" {
		return false
	}
	for i, c := range s {
		switch {
		case c == '_', c >= 'A' && c <= 'Z', c >= 'a' && c <= 'z':
		case c >= '0' && c <= '9' && i > 0:
		default:
			return false
		}
	}
	return true
}
