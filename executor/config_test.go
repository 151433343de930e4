package executor

import (
	"log/slog"
	"testing"
	"time"
)

func TestConfigFromEnv(t *testing.T) {
	cases := []struct {
		name    string
		env     map[string]string
		check   func(Config) bool
		wantErr bool
	}{
		{name: "defaults", env: nil, check: func(c Config) bool {
			return c.WorkspacePath == "/workspace" && c.ControlPlaneURL == "unix:///run/sandbox/agent.sock" &&
				c.Socket == "/run/sandbox/executor.sock" && c.Host == "0.0.0.0" && c.Port == "" &&
				c.Token == "" && c.LogLevel == slog.LevelInfo && c.Reaper && c.HeartbeatInterval == 5*time.Second &&
				c.StatusDelay == 100*time.Millisecond
		}},
		{name: "everything set", env: map[string]string{
			"WORKSPACE_PATH": "/ws", "CONTROL_PLANE_URL": "http://10.0.0.1:9000", "EXECUTOR_SOCKET": "/s/e.sock",
			"EXECUTOR_HOST": "127.0.0.1", "EXECUTOR_PORT": "8080", "INTERNAL_API_TOKEN": "t", "LOG_LEVEL": "debug",
			"BWRAP_PATH": "/opt/bwrap", "EXECUTOR_HEARTBEAT_INTERVAL": "250ms", "EXECUTOR_STATUS_DELAY": "0",
		}, check: func(c Config) bool {
			return c.WorkspacePath == "/ws" && c.ControlPlaneURL == "http://10.0.0.1:9000" && c.Socket == "/s/e.sock" &&
				c.Host == "127.0.0.1" && c.Port == "8080" && c.Token == "t" && c.LogLevel == slog.LevelDebug &&
				c.BwrapPath == "/opt/bwrap" && c.HeartbeatInterval == 250*time.Millisecond && c.StatusDelay == 0
		}},
		{name: "warn level", env: map[string]string{"LOG_LEVEL": "warn"}, check: func(c Config) bool { return c.LogLevel == slog.LevelWarn }},
		{name: "bad log level", env: map[string]string{"LOG_LEVEL": "loud"}, wantErr: true},
		{name: "relative workspace", env: map[string]string{"WORKSPACE_PATH": "ws"}, wantErr: true},
		{name: "bad url scheme", env: map[string]string{"CONTROL_PLANE_URL": "ftp://x"}, wantErr: true},
		{name: "relative unix url", env: map[string]string{"CONTROL_PLANE_URL": "unix://run/agent.sock"}, wantErr: true},
		{name: "service name as port", env: map[string]string{"EXECUTOR_PORT": "http"}, check: func(c Config) bool { return c.Port == "http" }},
		{name: "bad heartbeat", env: map[string]string{"EXECUTOR_HEARTBEAT_INTERVAL": "-1s"}, wantErr: true},
		{name: "bad status delay", env: map[string]string{"EXECUTOR_STATUS_DELAY": "soon"}, wantErr: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ConfigFromEnv(func(k string) string { return tc.env[k] })
			if (err != nil) != tc.wantErr {
				t.Fatalf("err %v, want error %v", err, tc.wantErr)
			}
			if err == nil && !tc.check(c) {
				t.Errorf("config %+v", c)
			}
		})
	}
}

func TestParseControlPlaneURL(t *testing.T) {
	cases := []struct{ in, base, socket string }{
		{"unix:///run/sandbox/agent.sock", "http://control-plane", "/run/sandbox/agent.sock"},
		{"http://agent:8081", "http://agent:8081", ""},
		{"http://agent:8081/", "http://agent:8081", ""},
		{"https://agent/prefix/", "https://agent/prefix", ""},
	}
	for _, tc := range cases {
		base, sock, err := parseControlPlaneURL(tc.in)
		if err != nil || base != tc.base || sock != tc.socket {
			t.Errorf("parseControlPlaneURL(%q) = %q, %q, %v; want %q, %q", tc.in, base, sock, err, tc.base, tc.socket)
		}
	}
}
