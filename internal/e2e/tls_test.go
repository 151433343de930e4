package e2e

import (
	"context"
	"net/http"
	"testing"

	"connectrpc.com/connect"

	"github.com/sandboxhq/sandbox/api"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/v1/sandboxv1connect"
)

// TestPublicTLS: with --tls-cert-file and --tls-key-file the public API is
// served over TLS on every server, and followers forward to the leader
// over TLS; sandboxctl reaches any server with https and -ca-file; a
// cleartext client, or one that does not trust the certificate, gets
// nothing.
func TestPublicTLS(t *testing.T) {
	c := startServersIn(t, 3, t.TempDir, withTLS)
	for _, srv := range c.servers {
		out, errs, code := c.ctl("", "--addr", c.apiURL(srv.apiAddr), "exec", "--template", "python-basic", "-c", "print(6*7)")
		if out != "42\n" || code != 0 {
			t.Errorf("sandboxctl exec over https via %s: stdout %q, exit %d, stderr %q", srv.id, out, code, errs)
		}
	}
	ctx := context.Background()
	req := connect.NewRequest(&sandboxv1.ListTemplatesRequest{})
	if _, err := sandboxv1connect.NewTemplateServiceClient(api.NewH2CClient(), "http://"+c.apiAddr, api.WithBearer(apiKey)).ListTemplates(ctx, req); err == nil {
		t.Error("a cleartext h2c client was served by a TLS API")
	}
	if _, err := sandboxv1connect.NewTemplateServiceClient(&http.Client{}, "https://"+c.apiAddr, api.WithBearer(apiKey)).ListTemplates(ctx, req); err == nil {
		t.Error("a client that does not trust the certificate was served")
	}
}
