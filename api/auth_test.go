package api

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sandboxhq/sandbox/api/gen/sandbox/v1/sandboxv1connect"
)

func writeKeys(t *testing.T, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "api-keys")
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoadKeys(t *testing.T) {
	sum := sha256.Sum256([]byte("hashed-key-0123456789"))
	k, err := LoadKeys(writeKeys(t, `# tenants
bare-key-0123456789
ops admin-key-0123456789 admin
acme acme-key-0123456789 sessions=3 executions=2.5
acme acme-key2-0123456789 rate=10
globex sha256:`+hex.EncodeToString(sum[:])+`
`))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		key, tenant string
		admin       bool
	}{
		{"bare-key-0123456789", "default", false},
		{"admin-key-0123456789", "ops", true},
		{"acme-key-0123456789", "acme", false},
		{"acme-key2-0123456789", "acme", false},
		{"hashed-key-0123456789", "globex", false},
	} {
		e, ok := k.lookup(c.key)
		if !ok || e.tenant != c.tenant || e.admin != c.admin {
			t.Errorf("key %s: %+v %v, want tenant %s admin %v", c.key, e, ok, c.tenant, c.admin)
		}
	}
	if _, ok := k.lookup("sha256:" + hex.EncodeToString(sum[:])); ok {
		t.Error("the hash itself was accepted as a key")
	}
	if q := k.Tenant("acme"); q == nil || q.MaxSessions != 3 || q.ExecutionsPerSecond != 2.5 {
		t.Errorf("acme's quotas: %+v", q)
	}
	if q := k.Tenant("globex"); q == nil || q.MaxSessions != 0 || !q.AllowExecution() {
		t.Errorf("globex has no quotas: %+v", q)
	}
	if k.Admins() != 1 {
		t.Errorf("%d admin keys, want 1", k.Admins())
	}

	for name, text := range map[string]string{
		"short key":        "acme short",
		"bad hash":         "acme sha256:abc",
		"upper-case hash":  "acme sha256:" + strings.ToUpper(hex.EncodeToString(sum[:])),
		"unknown option":   "acme acme-key-0123456789 superuser",
		"bad rate":         "acme acme-key-0123456789 rate=0",
		"bad sessions":     "acme acme-key-0123456789 sessions=-1",
		"bad tenant":       "ac/me acme-key-0123456789",
		"key twice":        "acme acme-key-0123456789\nglobex acme-key-0123456789",
		"quotas disagree":  "acme acme-key-0123456789 sessions=3\nacme acme-key2-0123456789 sessions=4",
		"no key":           "# nothing\n",
		"admin with value": "acme acme-key-0123456789 admin=yes",
	} {
		if _, err := LoadKeys(writeKeys(t, text)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// TestClusterKeyIsAdmin: the internal ports' cluster token acts on every
// tenant's objects (an agent's report of any tenant's execution).
func TestClusterKeyIsAdmin(t *testing.T) {
	k := &Keys{}
	k.AddAdmin("cluster", "cluster-token-0123456789")
	ctx, err := (&authInterceptor{keys: k}).check(context.Background(), map[string][]string{"Authorization": {"Bearer cluster-token-0123456789"}})
	if err != nil || !IsAdmin(ctx) || !CanSee(ctx, "acme") {
		t.Fatalf("the cluster token: %v, admin %v", err, IsAdmin(ctx))
	}
}

func TestBucket(t *testing.T) {
	b := newBucket(2)
	now := time.Unix(1000, 0)
	if !b.allow(now) || !b.allow(now) || b.allow(now) {
		t.Fatal("a bucket of 2 a second did not allow exactly 2 at once")
	}
	if !b.allow(now.Add(500 * time.Millisecond)) {
		t.Error("half a second later one more is due")
	}
	if b.allow(now.Add(500 * time.Millisecond)) {
		t.Error("but not two")
	}
	slow := newBucket(0.5) // one every 2 s, bursts of 1
	if !slow.allow(now) || slow.allow(now.Add(time.Second)) || !slow.allow(now.Add(2*time.Second)) {
		t.Error("a rate below one a second")
	}
}

func TestPrincipals(t *testing.T) {
	ctx := context.Background()
	if !CanSee(ctx, "acme") {
		t.Error("an internal call (no principal) cannot see a tenant's objects")
	}
	acme := WithPrincipal(ctx, "acme", false)
	if !CanSee(acme, "acme") || CanSee(acme, "globex") || IsAdmin(acme) || Principal(acme) != "acme" {
		t.Error("a tenant's call sees its own objects only")
	}
	if admin := WithPrincipal(ctx, "ops", true); !CanSee(admin, "globex") || !IsAdmin(admin) {
		t.Error("an admin's call sees every tenant's objects")
	}
	for _, p := range []string{
		sandboxv1connect.TemplateServiceUpdateTemplateProcedure,
		sandboxv1connect.TemplateServiceCreateTemplateProcedure,
		sandboxv1connect.TemplateServiceDeleteTemplateProcedure,
		sandboxv1connect.ClusterServiceListNodesProcedure,
		sandboxv1connect.ClusterServiceSaveSnapshotProcedure,
	} {
		if !needsAdmin(p) || (adminOnly{}).check(acme, p) == nil {
			t.Errorf("%s is open to a tenant's key", p)
		}
	}
	for _, p := range []string{
		sandboxv1connect.TemplateServiceListTemplatesProcedure,
		sandboxv1connect.SessionServiceCreateSessionProcedure,
		sandboxv1connect.ExecutionServiceExecuteProcedure,
	} {
		if needsAdmin(p) {
			t.Errorf("%s needs an admin key", p)
		}
	}
}
