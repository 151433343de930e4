// Package e2e runs the whole platform as an operator would: real
// sandbox-scheduler and sandbox-agent processes, real containerd, runc and
// bubblewrap, the images `make images` built, and the public API and
// sandboxctl as clients.
package e2e

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"
	containerd "github.com/containerd/containerd"
	"github.com/containerd/containerd/namespaces"

	"github.com/sandboxhq/sandbox/api"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/v1/sandboxv1connect"
	"github.com/sandboxhq/sandbox/internal/testenv"
)

const apiKey = "e2e-test-key-0123456789abcdef"

// Keys of two more tenants, for the tenant tests: tenantKey (tenant "acme",
// at most 3 live sessions) and otherKey (tenant "globex", 20 calls a second),
// stored hashed as an operator would.
const (
	tenantKey = "acme-key-0123456789abcdef"
	otherKey  = "globex-key-0123456789abcdef"
)

// apiKeysFile is the servers' key file: the admin key, then the tenants'.
var apiKeysFile = "e2e " + apiKey + " admin\n" +
	"acme sha256:" + sha256Hex(tenantKey) + " sessions=3\n" +
	"globex " + otherKey + " rate=20 executions=2\n"

func sha256Hex(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// binaries builds the four commands once per test binary.
func binaries(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "sandbox-e2e-bin-")
		if err != nil {
			buildErr = err
			return
		}
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Join(filepath.Dir(file), "..", "..")
		cmd := exec.Command("go", "build", "-o", dir+"/", "./cmd/sandbox-scheduler", "./cmd/sandbox-agent", "./cmd/sandbox-executor", "./cmd/sandboxctl")
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		out, err := cmd.CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
		binDir = dir
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binDir
}

var (
	portsMu sync.Mutex
	ports   = map[string]bool{}
)

// freePort returns a loopback address free now and never handed out before
// in this test binary (the kernel may offer a just-closed port again).
func freePort(t *testing.T) string {
	t.Helper()
	portsMu.Lock()
	defer portsMu.Unlock()
	for {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		if !ports[addr] {
			ports[addr] = true
			return addr
		}
	}
}

// server is one sandbox-scheduler process.
type server struct {
	id                                          string
	apiAddr, internalAddr, raftAddr, gossipAddr string
	cmd                                         *exec.Cmd
	// standalone starts the server with no peers, waiting to be joined.
	standalone bool
}

// cluster is scheduler servers and one agent running as separate processes.
type cluster struct {
	t            *testing.T
	bin, dir     string
	servers      []*server
	apiAddr      string // the first server's, which the clients use
	internalAddr string
	agentAddr    string
	agentGossip  string
	agentID      string
	containerd   string
	// runtimeArgs choose the agents' runtime (runtimeArgs).
	runtimeArgs []string
	agent       *exec.Cmd
	// tlsDir, when set, holds the public API's certificate (cert.pem, which
	// is also the CA clients trust) and key: the servers serve the API
	// over TLS and the clients call it with https.
	tlsDir string

	sessions   sandboxv1connect.SessionServiceClient
	executions sandboxv1connect.ExecutionServiceClient
	templates  sandboxv1connect.TemplateServiceClient
}

func requireImages(t *testing.T, addr string, names ...string) {
	t.Helper()
	c, err := containerd.New(addr)
	if err != nil {
		testenv.Unavailable(t, "containerd client: %v", err)
	}
	defer c.Close()
	ctx := namespaces.WithNamespace(context.Background(), "sandbox")
	for _, n := range names {
		if _, err := c.GetImage(ctx, "localhost/sandbox/"+n+":latest"); err != nil {
			testenv.Unavailable(t, "image %s is not in containerd (run make images): %v", n, err)
		}
	}
}

func startCluster(t *testing.T) *cluster { return startServers(t, 1) }

// startServers starts n servers (one Raft cluster) and one agent.
func startServers(t *testing.T, n int) *cluster {
	t.Helper()
	return startServersIn(t, n, t.TempDir)
}

// startServersIn is startServers with the cluster's files in the directory
// dir returns. Keep it short: the agent's unix socket paths, under it, must
// fit in 108 bytes, and t.TempDir grows with the test's name.
func startServersIn(t *testing.T, n int, dir func() string, opts ...func(*cluster)) *cluster {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end test; -short skips it")
	}
	addr := testenv.RequireContainerd(t)
	testenv.RequireBinary(t, "bwrap")
	requireImages(t, addr, "python-basic", "nodejs-basic")
	rtArgs := runtimeArgs(t, addr, "python-basic", "nodejs-basic")
	c := &cluster{
		runtimeArgs: rtArgs,
		t:           t,
		bin:         binaries(t),
		dir:         dir(),
		agentAddr:   freePort(t),
		agentGossip: freePort(t),
		agentID:     fmt.Sprintf("e2e-%d", time.Now().UnixNano()),
		containerd:  addr,
	}
	for i := range n {
		c.servers = append(c.servers, &server{id: fmt.Sprintf("e2e-%d", i+1), apiAddr: freePort(t), internalAddr: freePort(t), raftAddr: freePort(t), gossipAddr: freePort(t)})
	}
	c.apiAddr, c.internalAddr = c.servers[0].apiAddr, c.servers[0].internalAddr
	for _, o := range opts {
		o(c)
	}
	must(t, os.WriteFile(filepath.Join(c.dir, "api-keys"), []byte(apiKeysFile), 0o600))
	must(t, os.WriteFile(filepath.Join(c.dir, "cluster-token"), []byte("e2e-cluster-token-0123456789\n"), 0o600))
	for _, srv := range c.servers {
		c.startServer(srv)
	}
	c.startAgent(addr)
	t.Cleanup(c.stop)
	c.useServer(c.servers[0])
	c.waitReady()
	return c
}

// useServer points the clients at one server.
func (c *cluster) useServer(srv *server) {
	c.apiAddr = srv.apiAddr
	cl := c.clientsFor(apiKey)
	c.sessions, c.executions, c.templates = cl.sessions, cl.executions, cl.templates
}

// apiURL is the URL of a server's API address.
func (c *cluster) apiURL(addr string) string {
	if c.tlsDir != "" {
		return "https://" + addr
	}
	return "http://" + addr
}

// httpClient speaks to the API: h2c, or HTTP/2 over TLS trusting the
// cluster's certificate.
func (c *cluster) httpClient() *http.Client {
	if c.tlsDir == "" {
		return api.NewH2CClient()
	}
	roots, err := api.RootsFrom(filepath.Join(c.tlsDir, "cert.pem"))
	must(c.t, err)
	return &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}, ForceAttemptHTTP2: true}}
}

// withTLS makes the cluster serve its public API over TLS, with a
// self-signed certificate for 127.0.0.1 that every server shares.
func withTLS(c *cluster) {
	c.tlsDir = filepath.Join(c.dir, "tls")
	must(c.t, os.MkdirAll(c.tlsDir, 0o700))
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(c.t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "sandbox e2e"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"},
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	must(c.t, err)
	kder, err := x509.MarshalECPrivateKey(key)
	must(c.t, err)
	must(c.t, os.WriteFile(filepath.Join(c.tlsDir, "cert.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600))
	must(c.t, os.WriteFile(filepath.Join(c.tlsDir, "key.pem"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600))
}

// clients are the public API's clients for one key.
type clients struct {
	sessions   sandboxv1connect.SessionServiceClient
	executions sandboxv1connect.ExecutionServiceClient
	templates  sandboxv1connect.TemplateServiceClient
	cluster    sandboxv1connect.ClusterServiceClient
}

// clientsFor returns clients that call the current server with key.
func (c *cluster) clientsFor(key string) clients {
	hc, url := c.httpClient(), c.apiURL(c.apiAddr)
	return clients{
		sessions:   sandboxv1connect.NewSessionServiceClient(hc, url, api.WithBearer(key)),
		executions: sandboxv1connect.NewExecutionServiceClient(hc, url, api.WithBearer(key)),
		templates:  sandboxv1connect.NewTemplateServiceClient(hc, url, api.WithBearer(key)),
		cluster:    sandboxv1connect.NewClusterServiceClient(hc, url, api.WithBearer(key)),
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func (c *cluster) logFile(name string) *os.File {
	f, err := os.OpenFile(filepath.Join(c.dir, name+".log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	must(c.t, err)
	return f
}

func (c *cluster) startServer(srv *server) {
	args := []string{"--id", srv.id, "--data-dir", filepath.Join(c.dir, srv.id),
		"--api-addr", srv.apiAddr, "--internal-addr", srv.internalAddr, "--raft-addr", srv.raftAddr,
		"--api-keys-file", filepath.Join(c.dir, "api-keys"), "--cluster-token-file", filepath.Join(c.dir, "cluster-token"),
		"--gossip-addr", srv.gossipAddr, "--log-level", "debug"}
	if srv.standalone {
		var gossip []string
		for _, o := range c.servers {
			if o != srv {
				gossip = append(gossip, o.gossipAddr)
			}
		}
		args = append(args, "--bootstrap-expect", "0", "--gossip-join", strings.Join(gossip, ","))
	} else if len(c.servers) > 1 {
		var peers, gossip []string
		for _, o := range c.servers {
			if o != srv {
				peers = append(peers, o.internalAddr)
				gossip = append(gossip, o.gossipAddr)
			}
		}
		args = append(args, "--bootstrap-expect", fmt.Sprint(len(c.servers)), "--join", strings.Join(peers, ","),
			"--gossip-join", strings.Join(gossip, ","))
	}
	if c.tlsDir != "" {
		args = append(args, "--tls-cert-file", filepath.Join(c.tlsDir, "cert.pem"), "--tls-key-file", filepath.Join(c.tlsDir, "key.pem"))
	}
	// SANDBOX_TEST_SERVER_ARGS adds flags to every server, e.g. other Raft
	// timeouts for failover measurements.
	args = append(args, strings.Fields(os.Getenv("SANDBOX_TEST_SERVER_ARGS"))...)
	cmd := exec.Command(filepath.Join(c.bin, "sandbox-scheduler"), args...)
	cmd.Stdout = c.logFile(srv.id)
	cmd.Stderr = cmd.Stdout
	must(c.t, cmd.Start())
	srv.cmd = cmd
}

func (c *cluster) startAgent(containerdAddr string) {
	rt := []string{"--containerd-address", containerdAddr}
	if testRuntime() == "docker" {
		rt = c.runtimeArgs
	}
	cmd := exec.Command(filepath.Join(c.bin, "sandbox-agent"), append([]string{
		"--id", c.agentID, "--data-dir", filepath.Join(c.dir, "agent"),
		"--listen", c.agentAddr, "--server", c.serverURLs(), "--gossip-join", c.gossipAddrs(), "--gossip-addr", c.agentGossip,
		"--cluster-token-file", filepath.Join(c.dir, "cluster-token"),
		"--log-level", "debug"}, rt...)...)
	cmd.Stdout = c.logFile("agent")
	cmd.Stderr = cmd.Stdout
	must(c.t, cmd.Start())
	c.agent = cmd
}

// secondAgent is another agent process on the same host, for tests that
// need somewhere else for sessions to go.
type secondAgent struct {
	id, addr, gossip string
	cmd              *exec.Cmd
}

// startSecondAgent starts one more agent; the cluster stops it at the end.
func (c *cluster) startSecondAgent() *secondAgent {
	a := &secondAgent{id: c.agentID + "-b", addr: freePort(c.t), gossip: freePort(c.t)}
	cmd := exec.Command(filepath.Join(c.bin, "sandbox-agent"), append([]string{
		"--id", a.id, "--data-dir", filepath.Join(c.dir, "agent-b"),
		"--listen", a.addr, "--server", c.serverURLs(), "--gossip-join", c.gossipAddrs(), "--gossip-addr", a.gossip,
		"--cluster-token-file", filepath.Join(c.dir, "cluster-token"),
		"--log-level", "debug"}, c.runtimeArgs...)...)
	cmd.Stdout = c.logFile("agent-b")
	cmd.Stderr = cmd.Stdout
	must(c.t, cmd.Start())
	a.cmd = cmd
	c.t.Cleanup(func() { stopProcess(cmd) })
	return a
}

// serverURLs lists every server's internal URL, for the agent.
func (c *cluster) serverURLs() string {
	var urls []string
	for _, srv := range c.servers {
		urls = append(urls, "http://"+srv.internalAddr)
	}
	return strings.Join(urls, ",")
}

// gossipAddrs lists every server's gossip address, for the agent.
func (c *cluster) gossipAddrs() string {
	var out []string
	for _, srv := range c.servers {
		out = append(out, srv.gossipAddr)
	}
	return strings.Join(out, ",")
}

// kill9 kills a process the hard way and reaps it.
func kill9(cmd *exec.Cmd) {
	if cmd == nil || cmd.Process == nil {
		return
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
}

func stopProcess(cmd *exec.Cmd) {
	if cmd == nil || cmd.Process == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
}

func (c *cluster) stop() {
	stopProcess(c.agent)
	names := []string{"agent"}
	for _, srv := range c.servers {
		stopProcess(srv.cmd)
		names = append(names, srv.id)
	}
	if c.t.Failed() {
		for _, n := range names {
			b, _ := os.ReadFile(filepath.Join(c.dir, n+".log"))
			if len(b) > 20000 {
				b = b[len(b)-20000:]
			}
			c.t.Logf("--- %s log (tail) ---\n%s", n, b)
		}
	}
}

// restartScheduler stops the first server and starts it again on the same data.
func (c *cluster) restartScheduler() {
	stopProcess(c.servers[0].cmd)
	c.startServer(c.servers[0])
	c.waitAPI()
}

func (c *cluster) waitAPI() {
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := c.templates.GetTemplate(context.Background(), connect.NewRequest(&sandboxv1.GetTemplateRequest{TemplateId: "python-basic"}))
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("API not ready: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitReady waits until the API answers and a session can be placed.
func (c *cluster) waitReady() {
	c.waitAPI()
	deadline := time.Now().Add(60 * time.Second)
	for {
		s, err := c.sessions.CreateSession(context.Background(), connect.NewRequest(&sandboxv1.CreateSessionRequest{TemplateId: "python-basic"}))
		if err == nil {
			c.terminate(s.Msg.GetSession().GetId())
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("cluster not ready: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (c *cluster) createSession(req *sandboxv1.CreateSessionRequest) *sandboxv1.Session {
	c.t.Helper()
	resp, err := c.sessions.CreateSession(context.Background(), connect.NewRequest(req))
	if err != nil {
		c.t.Fatalf("CreateSession: %v", err)
	}
	s := resp.Msg.GetSession()
	if s.GetState() != sandboxv1.SessionState_SESSION_STATE_RUNNING {
		c.t.Fatalf("new session is %v, want RUNNING", s.GetState())
	}
	return s
}

func (c *cluster) terminate(id string) *sandboxv1.Session {
	c.t.Helper()
	resp, err := c.sessions.TerminateSession(context.Background(), connect.NewRequest(&sandboxv1.TerminateSessionRequest{SessionId: id}))
	if err != nil {
		c.t.Fatalf("TerminateSession %s: %v", id, err)
	}
	return resp.Msg.GetSession()
}

func (c *cluster) execute(req *sandboxv1.ExecuteRequest) *sandboxv1.Execution {
	c.t.Helper()
	resp, err := c.executions.Execute(context.Background(), connect.NewRequest(req))
	if err != nil {
		c.t.Fatalf("Execute: %v", err)
	}
	return resp.Msg.GetExecution()
}

// ctl runs sandboxctl against the cluster; it returns stdout, stderr and the exit code.
func (c *cluster) ctl(stdin string, args ...string) (string, string, int) {
	c.t.Helper()
	cmd := exec.Command(filepath.Join(c.bin, "sandboxctl"), args...)
	cmd.Env = append(os.Environ(), "SANDBOX_ADDR="+c.apiURL(c.apiAddr), "SANDBOX_API_KEY="+apiKey)
	if c.tlsDir != "" {
		cmd.Env = append(cmd.Env, "SANDBOX_CA_FILE="+filepath.Join(c.tlsDir, "cert.pem"))
	}
	cmd.Dir = c.dir
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		c.t.Fatalf("sandboxctl %v: %v", args, err)
	}
	return out.String(), errb.String(), code
}

// containersOf lists the containerd containers carrying a session's label.
func containersOf(t *testing.T, sessionID string) []string {
	t.Helper()
	cl, err := containerd.New(testenv.ContainerdAddress())
	must(t, err)
	defer cl.Close()
	ctx := namespaces.WithNamespace(context.Background(), "sandbox")
	cs, err := cl.Containers(ctx, fmt.Sprintf("labels.%q==%s", "sandbox.session", sessionID))
	must(t, err)
	var ids []string
	for _, c := range cs {
		ids = append(ids, c.ID())
	}
	for _, c := range cs {
		if _, err := c.Task(ctx, nil); err == nil {
			ids = append(ids, "task:"+c.ID())
		}
	}
	return ids
}

// warmContainers lists the containers warm pools hold unclaimed.
// waitWarm waits until ClusterService.ListNodes shows want ready warm
// containers of template across the agents.
func (c *cluster) waitWarm(t *testing.T, template string, want int32) {
	t.Helper()
	cl := sandboxv1connect.NewClusterServiceClient(c.httpClient(), c.apiURL(c.apiAddr), api.WithBearer(apiKey))
	ready := func() int32 {
		resp, err := cl.ListNodes(context.Background(), connect.NewRequest(&sandboxv1.ListNodesRequest{}))
		must(t, err)
		var n int32
		for _, node := range resp.Msg.GetNodes() {
			for _, p := range node.GetWarmPools() {
				if p.GetTemplateId() == template {
					n += p.GetReady()
				}
			}
		}
		return n
	}
	deadline := time.Now().Add(60 * time.Second)
	for ready() != want {
		if time.Now().After(deadline) {
			t.Fatalf("ListNodes shows %d ready %s containers, want %d", ready(), template, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func warmContainers(t *testing.T) []string {
	t.Helper()
	cl, err := containerd.New(testenv.ContainerdAddress())
	must(t, err)
	defer cl.Close()
	ctx := namespaces.WithNamespace(context.Background(), "sandbox")
	cs, err := cl.Containers(ctx, `labels."sandbox.warm"==true`)
	must(t, err)
	var ids []string
	for _, c := range cs {
		labels, err := c.Labels(ctx)
		must(t, err)
		if labels["sandbox.session"] == "" {
			ids = append(ids, c.ID())
		}
	}
	return ids
}

func metrics(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	must(t, err)
	defer resp.Body.Close()
	var b bytes.Buffer
	_, _ = b.ReadFrom(resp.Body)
	return b.String()
}

// killTask SIGKILLs a container's init process (the executor) behind the agent's back.
func killTask(t *testing.T, containerID string) {
	t.Helper()
	cl, err := containerd.New(testenv.ContainerdAddress())
	must(t, err)
	defer cl.Close()
	ctx := namespaces.WithNamespace(context.Background(), "sandbox")
	ctr, err := cl.LoadContainer(ctx, containerID)
	must(t, err)
	task, err := ctr.Task(ctx, nil)
	must(t, err)
	must(t, task.Kill(ctx, syscall.SIGKILL))
}
