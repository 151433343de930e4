package executor

import (
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"path/filepath"
	"strings"
	"time"

	"github.com/sandboxhq/sandbox/executor/executorapi"
)

// Config configures an Executor. DefaultConfig gives the production values;
// ConfigFromEnv reads them from the environment the way the container sets it.
type Config struct {
	// WorkspacePath is the directory bound read-write at /workspace for user code.
	WorkspacePath string
	// ControlPlaneURL is where callbacks go: unix:///path/to/agent.sock or http://host:port.
	ControlPlaneURL string
	// Socket is the unix socket the executor listens on when Port is empty.
	Socket string
	// Host and Port, when Port is set, make the executor listen on TCP instead.
	Host string
	Port string
	// Token is the bearer token known at start (INTERNAL_API_TOKEN); empty
	// until POST /init brings one.
	Token string
	// LogLevel is used when Logger is nil: JSON logs to stderr at this level.
	LogLevel slog.Level
	Logger   *slog.Logger
	// BwrapPath is the bubblewrap binary; empty means "bwrap" from PATH.
	BwrapPath string
	// HeartbeatInterval is how often a running execution reports a heartbeat.
	HeartbeatInterval time.Duration
	// StatusDelay is how long an execution runs before its RUNNING status
	// goes out (executorapi.StatusDelay); 0 reports it at once.
	StatusDelay time.Duration
	// CallbackRetryBudget bounds how long one callback (artifact or result) is retried.
	CallbackRetryBudget time.Duration
	// ShutdownGrace bounds how long Run waits, after its context ends, for
	// killed executions to report their results.
	ShutdownGrace time.Duration
	// Reaper makes the executor a child subreaper and reaps orphaned
	// descendants (its duty as a container's PID 1). Only the executor binary
	// turns it on: a reaper inside a process that runs other children (a test
	// binary) could collect their exit statuses.
	Reaper bool
}

// DefaultConfig returns the production configuration.
func DefaultConfig() Config {
	return Config{
		WorkspacePath:       sandboxWorkspace,
		ControlPlaneURL:     "unix://" + executorapi.SocketDir + "/" + executorapi.AgentSocket,
		Socket:              executorapi.SocketDir + "/" + executorapi.ExecutorSocket,
		Host:                "0.0.0.0",
		LogLevel:            slog.LevelInfo,
		HeartbeatInterval:   executorapi.HeartbeatInterval,
		StatusDelay:         executorapi.StatusDelay,
		CallbackRetryBudget: time.Minute,
		ShutdownGrace:       5 * time.Second,
	}
}

// ConfigFromEnv builds the executor binary's configuration from getenv
// (os.Getenv in main): WORKSPACE_PATH, CONTROL_PLANE_URL, EXECUTOR_SOCKET,
// EXECUTOR_HOST, EXECUTOR_PORT, INTERNAL_API_TOKEN, LOG_LEVEL, BWRAP_PATH and,
// for tests and tuning, EXECUTOR_HEARTBEAT_INTERVAL (a Go duration).
func ConfigFromEnv(getenv func(string) string) (Config, error) {
	cfg := DefaultConfig()
	cfg.Reaper = true
	set := func(dst *string, key string) {
		if v := getenv(key); v != "" {
			*dst = v
		}
	}
	set(&cfg.WorkspacePath, "WORKSPACE_PATH")
	set(&cfg.ControlPlaneURL, "CONTROL_PLANE_URL")
	set(&cfg.Socket, "EXECUTOR_SOCKET")
	set(&cfg.Host, "EXECUTOR_HOST")
	set(&cfg.Port, "EXECUTOR_PORT")
	set(&cfg.Token, "INTERNAL_API_TOKEN")
	set(&cfg.BwrapPath, "BWRAP_PATH")
	if v := getenv("LOG_LEVEL"); v != "" {
		if err := cfg.LogLevel.UnmarshalText([]byte(v)); err != nil {
			return Config{}, fmt.Errorf("LOG_LEVEL %q is not one of debug, info, warn, error", v)
		}
	}
	if v := getenv("EXECUTOR_HEARTBEAT_INTERVAL"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			return Config{}, fmt.Errorf("EXECUTOR_HEARTBEAT_INTERVAL %q is not a positive duration", v)
		}
		cfg.HeartbeatInterval = d
	}
	if v := getenv("EXECUTOR_STATUS_DELAY"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			return Config{}, fmt.Errorf("EXECUTOR_STATUS_DELAY %q is not a duration of 0 or more", v)
		}
		cfg.StatusDelay = d
	}
	return cfg, cfg.validate()
}

// validate checks the fields New cannot work without.
func (c Config) validate() error {
	if !filepath.IsAbs(c.WorkspacePath) {
		return fmt.Errorf("workspace path %q must be absolute", c.WorkspacePath)
	}
	if _, _, err := parseControlPlaneURL(c.ControlPlaneURL); err != nil {
		return err
	}
	if c.Port == "" && !filepath.IsAbs(c.Socket) {
		return fmt.Errorf("executor socket %q must be an absolute path", c.Socket)
	}
	if c.Port != "" {
		if _, err := net.LookupPort("tcp", c.Port); err != nil {
			return fmt.Errorf("executor port %q: %w", c.Port, err)
		}
	}
	return nil
}

// parseControlPlaneURL splits CONTROL_PLANE_URL into the base URL requests
// are built on and, for unix://PATH, the socket path to dial.
func parseControlPlaneURL(raw string) (base string, socket string, err error) {
	u, err := url.Parse(raw)
	if err != nil {
		return "", "", fmt.Errorf("control plane url %q: %w", raw, err)
	}
	switch u.Scheme {
	case "unix":
		p := u.Path
		if u.Host != "" { // unix://relative/path is not what anyone means
			return "", "", fmt.Errorf("control plane url %q: want unix:///absolute/path", raw)
		}
		if !filepath.IsAbs(p) {
			return "", "", fmt.Errorf("control plane url %q: socket path must be absolute", raw)
		}
		// The host part is ignored by the unix dialer; it only has to be valid.
		return "http://control-plane", p, nil
	case "http", "https":
		if u.Host == "" {
			return "", "", fmt.Errorf("control plane url %q has no host", raw)
		}
		return strings.TrimRight(u.Scheme+"://"+u.Host+u.Path, "/"), "", nil
	default:
		return "", "", fmt.Errorf("control plane url %q: scheme must be unix, http or https", raw)
	}
}
