package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sandboxhq/sandbox/internal/testenv"
)

// TestAgentRefusesWithoutRuntime: an agent whose containerd cannot be
// reached exits at once with a message that names the socket and says what
// to do, instead of starting and failing every session.
func TestAgentRefusesWithoutRuntime(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; -short skips it")
	}
	testenv.RequireRoot(t)
	dir := t.TempDir()
	token := filepath.Join(dir, "cluster-token")
	must(t, os.WriteFile(token, []byte("e2e-cluster-token-0123456789\n"), 0o600))
	missing := filepath.Join(dir, "no-containerd.sock")
	cmd := exec.Command(filepath.Join(binaries(t), "sandbox-agent"), "--id", "refuse-test", "--data-dir", filepath.Join(dir, "agent"),
		"--listen", "127.0.0.1:0", "--cluster-token-file", token, "--containerd-address", missing)
	begin := time.Now()
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("the agent started without containerd; output:\n%s", out)
	}
	if took := time.Since(begin); took > 5*time.Second {
		t.Errorf("the agent took %s to give up", took)
	}
	if msg := string(out); !strings.Contains(msg, "containerd at "+missing+" is unreachable") || !strings.Contains(msg, "is it running?") {
		t.Errorf("the agent's message does not name the socket and the remedy:\n%s", msg)
	}
}
