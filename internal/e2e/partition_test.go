package e2e

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/sandboxhq/sandbox/api"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/v1/sandboxv1connect"
	"github.com/sandboxhq/sandbox/internal/testenv"
)

// The ports every server uses on its own namespace's address.
const (
	nsAPIPort      = "7400"
	nsInternalPort = "7401"
	nsRaftPort     = "7300"
	nsGossipPort   = "7500"
)

// callTimeout bounds every client call of the partition test, so that a call
// to a server that cannot commit ends instead of hanging the test.
const callTimeout = 5 * time.Second

// runCmd runs a command and returns its error with its output.
func runCmd(stdin, name string, args ...string) error {
	cmd := exec.Command(name, args...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// testNet is a private network of one namespace per server: each has one
// veth link into a bridge that lives in a hub namespace, and the root
// namespace (the test process) has a link into the same bridge, so it reaches
// every server however the servers are cut from each other. Nothing leaves
// the machine.
type testNet struct {
	prefix   string   // "10.231.N."
	hub      string   // the bridge's namespace
	hostLink string   // the root namespace's link into the bridge
	ns       []string // one per server; server i has address prefix+(i+1)
}

// newTestNet builds the network for n servers; t.Cleanup removes all of it.
func newTestNet(t *testing.T, n int) *testNet {
	t.Helper()
	tag := randomHex(t, 3)
	tn := &testNet{hub: "sbx-p-" + tag + "-hub", hostLink: "sbxp" + tag}
	for range 20 {
		prefix := fmt.Sprintf("10.231.%d.", int(randomByte(t)))
		addrs, err := exec.Command("ip", "-4", "-o", "addr", "show").Output()
		must(t, err)
		routes, err := exec.Command("ip", "-4", "route", "show").Output()
		must(t, err)
		if !strings.Contains(string(addrs)+"\n"+string(routes), prefix) {
			tn.prefix = prefix
			break
		}
	}
	if tn.prefix == "" {
		t.Fatal("no free 10.231.N.0/24 subnet for the test network")
	}
	for i := range n {
		tn.ns = append(tn.ns, fmt.Sprintf("sbx-p-%s-%d", tag, i+1))
	}
	t.Cleanup(func() {
		// Deleting the namespaces destroys their links (and the veth
		// peers); the root link is deleted explicitly because namespace
		// teardown is asynchronous.
		_ = runCmd("", "ip", "link", "del", tn.hostLink)
		for _, ns := range append(slices.Clone(tn.ns), tn.hub) {
			_ = runCmd("", "ip", "netns", "del", ns)
		}
	})
	steps := [][]string{
		{"netns", "add", tn.hub},
		{"-n", tn.hub, "link", "add", "br0", "type", "bridge"},
		{"-n", tn.hub, "link", "set", "br0", "up"},
	}
	for i, ns := range tn.ns {
		leg := fmt.Sprintf("s%d", i+1)
		steps = append(steps,
			[]string{"netns", "add", ns},
			[]string{"-n", ns, "link", "set", "lo", "up"},
			[]string{"-n", tn.hub, "link", "add", leg, "type", "veth", "peer", "name", "eth0", "netns", ns},
			[]string{"-n", tn.hub, "link", "set", leg, "master", "br0", "up"},
			[]string{"-n", ns, "addr", "add", tn.addr(i) + "/24", "dev", "eth0"},
			[]string{"-n", ns, "link", "set", "eth0", "up"},
		)
	}
	steps = append(steps,
		[]string{"link", "add", tn.hostLink, "type", "veth", "peer", "name", "client", "netns", tn.hub},
		[]string{"-n", tn.hub, "link", "set", "client", "master", "br0", "up"},
		[]string{"addr", "add", tn.prefix + "254/24", "dev", tn.hostLink},
		[]string{"link", "set", tn.hostLink, "up"},
	)
	for _, s := range steps {
		must(t, runCmd("", "ip", s...))
	}
	t.Logf("test network %s0/24: namespaces %v, bridge in %s", tn.prefix, tn.ns, tn.hub)
	return tn
}

func (tn *testNet) addr(i int) string { return fmt.Sprintf("%s%d", tn.prefix, i+1) }

// firewall cuts a namespace off from some addresses by silently dropping
// packets in both directions (as a failed switch or a partitioned rack
// would), with nft or, without it, iptables.
type firewall string

func requireFirewall(t *testing.T) firewall {
	t.Helper()
	for _, f := range []firewall{"nft", "iptables"} {
		if _, err := exec.LookPath(string(f)); err == nil {
			return f
		}
	}
	testenv.Unavailable(t, "test needs nft (nftables) or iptables on PATH")
	return ""
}

const nftTable = "sbx_partition"

// cut drops all traffic between namespace ns and peers.
func (f firewall) cut(ns string, peers []string) error {
	if f == "nft" {
		set := strings.Join(peers, ", ")
		return runCmd(fmt.Sprintf(`table inet %s {
	chain in { type filter hook input priority 0; policy accept; ip saddr { %s } drop; }
	chain out { type filter hook output priority 0; policy accept; ip daddr { %s } drop; }
}
`, nftTable, set, set), "ip", "netns", "exec", ns, "nft", "-f", "-")
	}
	for _, p := range peers {
		for _, rule := range [][]string{{"INPUT", "-s", p}, {"OUTPUT", "-d", p}} {
			args := append([]string{"netns", "exec", ns, "iptables", "-w", "-I"}, append(rule, "-j", "DROP")...)
			if err := runCmd("", "ip", args...); err != nil {
				return err
			}
		}
	}
	return nil
}

// heal removes what cut added.
func (f firewall) heal(ns string, peers []string) error {
	if f == "nft" {
		return runCmd("", "ip", "netns", "exec", ns, "nft", "delete", "table", "inet", nftTable)
	}
	for _, p := range peers {
		for _, rule := range [][]string{{"INPUT", "-s", p}, {"OUTPUT", "-d", p}} {
			args := append([]string{"netns", "exec", ns, "iptables", "-w", "-D"}, append(rule, "-j", "DROP")...)
			if err := runCmd("", "ip", args...); err != nil {
				return err
			}
		}
	}
	return nil
}

// nsServer is one sandbox-scheduler process in its own network namespace.
type nsServer struct {
	id, ns, ip string
	cmd        *exec.Cmd
	log        string
	templates  sandboxv1connect.TemplateServiceClient
	cluster    sandboxv1connect.ClusterServiceClient
}

func (s *nsServer) at(port string) string { return s.ip + ":" + port }

// startNSServers starts one server per namespace of tn, forming one cluster.
func startNSServers(t *testing.T, tn *testNet) []*nsServer {
	t.Helper()
	bin, dir := binaries(t), t.TempDir()
	must(t, os.WriteFile(filepath.Join(dir, "api-keys"), []byte(apiKeysFile), 0o600))
	must(t, os.WriteFile(filepath.Join(dir, "cluster-token"), []byte("e2e-cluster-token-0123456789\n"), 0o600))
	var servers []*nsServer
	for i, ns := range tn.ns {
		s := &nsServer{id: fmt.Sprintf("p%d", i+1), ns: ns, ip: tn.addr(i)}
		s.log = filepath.Join(dir, s.id+".log")
		url := "http://" + s.at(nsAPIPort)
		s.templates = sandboxv1connect.NewTemplateServiceClient(api.NewH2CClient(), url, api.WithBearer(apiKey))
		s.cluster = sandboxv1connect.NewClusterServiceClient(api.NewH2CClient(), url, api.WithBearer(apiKey))
		servers = append(servers, s)
	}
	t.Cleanup(func() {
		var wg sync.WaitGroup
		for _, s := range servers {
			wg.Go(func() { stopProcess(s.cmd) })
		}
		wg.Wait()
		if !t.Failed() {
			return
		}
		for _, s := range servers {
			b, _ := os.ReadFile(s.log)
			if len(b) > 20000 {
				b = b[len(b)-20000:]
			}
			t.Logf("--- %s log (tail) ---\n%s", s.id, b)
		}
	})
	for _, s := range servers {
		var join, gossip []string
		for _, o := range servers {
			if o != s {
				join = append(join, o.at(nsInternalPort))
				gossip = append(gossip, o.at(nsGossipPort))
			}
		}
		args := []string{"netns", "exec", s.ns, filepath.Join(bin, "sandbox-scheduler"),
			"--id", s.id, "--data-dir", filepath.Join(dir, s.id),
			"--api-addr", s.at(nsAPIPort), "--internal-addr", s.at(nsInternalPort),
			"--raft-addr", s.at(nsRaftPort), "--gossip-addr", s.at(nsGossipPort),
			"--api-keys-file", filepath.Join(dir, "api-keys"), "--cluster-token-file", filepath.Join(dir, "cluster-token"),
			"--bootstrap-expect", fmt.Sprint(len(servers)), "--join", strings.Join(join, ","),
			"--gossip-join", strings.Join(gossip, ","), "--log-level", "debug"}
		f, err := os.Create(s.log)
		must(t, err)
		s.cmd = exec.Command("ip", args...)
		s.cmd.Stdout, s.cmd.Stderr = f, f
		err = s.cmd.Start()
		f.Close() // the child holds its own descriptor
		must(t, err)
	}
	return servers
}

func randomHex(t *testing.T, n int) string {
	b := make([]byte, n)
	_, err := rand.Read(b)
	must(t, err)
	return hex.EncodeToString(b)
}

func randomByte(t *testing.T) byte {
	b := make([]byte, 1)
	_, err := rand.Read(b)
	must(t, err)
	return b[0]
}

// readReq builds a request, marked stale when a local answer is wanted.
func readReq[T any](msg *T, stale bool) *connect.Request[T] {
	req := connect.NewRequest(msg)
	if stale {
		req.Header().Set("Sandbox-Read-Consistency", "stale")
	}
	return req
}

func (s *nsServer) status(stale bool) (*sandboxv1.GetClusterStatusResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	resp, err := s.cluster.GetClusterStatus(ctx, readReq(&sandboxv1.GetClusterStatusRequest{}, stale))
	if err != nil {
		return nil, err
	}
	return resp.Msg, nil
}

func (s *nsServer) createTemplate(id string) error {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	_, err := s.templates.CreateTemplate(ctx, connect.NewRequest(&sandboxv1.CreateTemplateRequest{Template: &sandboxv1.Template{
		Id: id, Image: "localhost/sandbox/partition-test:latest", Languages: []string{"python"},
	}}))
	return err
}

func (s *nsServer) getTemplate(id string, stale bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	_, err := s.templates.GetTemplate(ctx, readReq(&sandboxv1.GetTemplateRequest{TemplateId: id}, stale))
	return err
}

// templateIDs lists the template ids a server returns, sorted.
func (s *nsServer) templateIDs(stale bool) ([]string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	resp, err := s.templates.ListTemplates(ctx, readReq(&sandboxv1.ListTemplatesRequest{}, stale))
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, tpl := range resp.Msg.GetTemplates() {
		ids = append(ids, tpl.GetId())
	}
	slices.Sort(ids)
	return ids, nil
}

// waitAgreedLeader polls (with stale reads, so every server answers from its
// own view) until all of among name one leader that is one of them and not
// the server with id exclude, and returns it.
func waitAgreedLeader(t *testing.T, among []*nsServer, exclude string, within time.Duration) *nsServer {
	t.Helper()
	deadline := time.Now().Add(within)
	var last string
	for {
		var id string
		agree := true
		for _, s := range among {
			st, err := s.status(true)
			switch {
			case err != nil:
				last, agree = fmt.Sprintf("%s: %v", s.id, err), false
			case st.GetLeaderId() == "" || (id != "" && st.GetLeaderId() != id):
				last, agree = fmt.Sprintf("%s sees leader %q (term %d)", s.id, st.GetLeaderId(), st.GetTerm()), false
			default:
				id = st.GetLeaderId()
			}
			if !agree {
				break
			}
		}
		if agree && id != exclude {
			for _, s := range among {
				if s.id == id {
					return s
				}
			}
			last = fmt.Sprintf("agreed leader %q is not among the polled servers", id)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no agreed leader among %d servers within %v: %s", len(among), within, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitFor polls cond until it returns nil or within passes.
func waitFor(t *testing.T, within time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v: %v", what, within, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// wantNoCommit checks the error of a call an isolated server cannot serve:
// it must fail as unavailable or by running out of its deadline.
func wantNoCommit(t *testing.T, what string, err error, took time.Duration) {
	t.Helper()
	if err == nil {
		t.Errorf("%s: succeeded at the isolated old leader", what)
		return
	}
	t.Logf("%s at the isolated old leader failed after %v: %v", what, took.Round(time.Millisecond), err)
	if c := connect.CodeOf(err); c != connect.CodeUnavailable && c != connect.CodeDeadlineExceeded {
		t.Errorf("%s: code %v, want unavailable or deadline_exceeded: %v", what, c, err)
	}
}

// TestPartition runs three servers as separate processes, each in its own
// network namespace, and cuts the leader off from the two others with a
// firewall in its namespace while the test can still reach it: the majority
// elects a new leader and commits, the old leader commits nothing and
// refuses linearizable reads (answering only reads marked stale), and once
// healed it follows, converges and forwards writes again.
func TestPartition(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; -short skips it")
	}
	testenv.RequireRoot(t)
	testenv.RequireBinary(t, "ip")
	fw := requireFirewall(t)
	binaries(t) // build before any timing starts
	tn := newTestNet(t, 3)
	servers := startNSServers(t, tn)
	tag := randomHex(t, 3)
	begin := time.Now()

	old := waitAgreedLeader(t, servers, "", 60*time.Second)
	var followers []*nsServer
	var followerIPs []string
	for _, s := range servers {
		if s != old {
			followers = append(followers, s)
			followerIPs = append(followerIPs, s.ip)
		}
	}
	t.Logf("cluster formed in %v, leader %s", time.Since(begin).Round(time.Millisecond), old.id)
	// Servers other than the first leader record their addresses on their
	// first housekeeping tick after the cluster forms; a follower can forward
	// to a leader only once that leader's record is applied. Wait for a
	// settled cluster: every record in place and forwarding from every
	// follower.
	for _, f := range followers {
		waitFor(t, 20*time.Second, "every server recorded, seen through "+f.id, func() error {
			st, err := f.status(false)
			if err != nil {
				return err
			}
			recorded := 0
			for _, srv := range st.GetServers() {
				if srv.GetApiAddress() != "" {
					recorded++
				}
			}
			if st.GetLeaderId() != old.id || len(st.GetServers()) != 3 || recorded != 3 {
				return fmt.Errorf("status %v", st)
			}
			return nil
		})
	}
	t.Logf("every server recorded %v after start", time.Since(begin).Round(time.Millisecond))

	before := "before-" + tag
	must(t, old.createTemplate(before))
	for _, s := range servers {
		waitFor(t, 20*time.Second, s.id+" applies "+before, func() error { return s.getTemplate(before, true) })
	}

	must(t, fw.cut(old.ns, followerIPs))
	cutAt := time.Now()
	t.Logf("partitioned %s (%s) from %v with %s", old.id, old.ip, followerIPs, fw)

	// At once and together, while the old leader still believes it leads
	// (until its lease runs out): the write is appended to its log but
	// cannot commit, the read cannot confirm the leadership.
	isolated1 := "isolated-1-" + tag
	var writeErr, readErr error
	var writeTook, readTook time.Duration
	var wg sync.WaitGroup
	wg.Go(func() {
		start := time.Now()
		writeErr = old.createTemplate(isolated1)
		writeTook = time.Since(start)
	})
	wg.Go(func() {
		start := time.Now()
		_, readErr = old.templateIDs(false)
		readTook = time.Since(start)
	})
	wg.Wait()
	wantNoCommit(t, "write right after the cut", writeErr, writeTook)
	wantNoCommit(t, "linearizable read right after the cut", readErr, readTook)

	newLead := waitAgreedLeader(t, followers, old.id, 30*time.Second)
	t.Logf("majority elected %s %v after the cut", newLead.id, time.Since(cutAt).Round(time.Millisecond))

	majority := "majority-" + tag
	start := time.Now()
	must(t, newLead.createTemplate(majority))
	t.Logf("write through the majority's leader committed in %v", time.Since(start).Round(time.Millisecond))
	for _, s := range followers {
		if err := s.getTemplate(majority, false); err != nil {
			t.Fatalf("linearizable read of %s through %s: %v", majority, s.id, err)
		}
	}

	// Later, when the old leader has had every chance to notice.
	isolated2 := "isolated-2-" + tag
	start = time.Now()
	err := old.createTemplate(isolated2)
	wantNoCommit(t, "write during the partition", err, time.Since(start))
	start = time.Now()
	_, err = old.templateIDs(false)
	wantNoCommit(t, "linearizable read during the partition", err, time.Since(start))
	start = time.Now()
	err = old.getTemplate(majority, false)
	wantNoCommit(t, "linearizable get during the partition", err, time.Since(start))

	staleIDs, err := old.templateIDs(true)
	if err != nil {
		t.Fatalf("stale read at the isolated old leader: %v", err)
	}
	if !slices.Contains(staleIDs, before) || slices.Contains(staleIDs, majority) {
		t.Fatalf("stale read at the isolated old leader: %v; want %s and not %s", staleIDs, before, majority)
	}
	if st, err := old.status(true); err == nil {
		t.Logf("isolated old leader's own view: leader %q, term %d, commit index %d", st.GetLeaderId(), st.GetTerm(), st.GetCommitIndex())
	}

	must(t, fw.heal(old.ns, followerIPs))
	healAt := time.Now()
	lead := waitAgreedLeader(t, servers, "", 30*time.Second)
	t.Logf("after healing, all three follow %s within %v", lead.id, time.Since(healAt).Round(time.Millisecond))
	if lead == old {
		t.Errorf("the old leader %s leads again after healing; want the majority's leader to keep its place", old.id)
	}
	waitFor(t, 20*time.Second, old.id+" is a follower in the cluster status", func() error {
		st, err := lead.status(false)
		if err != nil {
			return err
		}
		for _, srv := range st.GetServers() {
			if srv.GetId() == old.id && srv.GetRole() == sandboxv1.ServerRole_SERVER_ROLE_FOLLOWER && len(st.GetServers()) == 3 {
				return nil
			}
		}
		return fmt.Errorf("status %v", st)
	})

	var want []string
	waitFor(t, 20*time.Second, old.id+" converges to the majority's templates", func() error {
		var err error
		if want, err = lead.templateIDs(false); err != nil {
			return err
		}
		got, err := old.templateIDs(true)
		if err != nil {
			return err
		}
		if !slices.Equal(got, want) {
			return fmt.Errorf("%s has %v, the leader %v", old.id, got, want)
		}
		return nil
	})
	t.Logf("%s converged %v after healing", old.id, time.Since(healAt).Round(time.Millisecond))
	if !slices.Contains(want, before) || !slices.Contains(want, majority) {
		t.Errorf("templates after healing %v lack %s or %s", want, before, majority)
	}
	for _, s := range servers {
		for _, stale := range []bool{true, false} {
			ids, err := s.templateIDs(stale)
			if err != nil {
				t.Fatalf("list at %s (stale %v): %v", s.id, stale, err)
			}
			if slices.Contains(ids, isolated1) || slices.Contains(ids, isolated2) {
				t.Errorf("%s (stale %v) shows a write the isolated leader never acknowledged: %v", s.id, stale, ids)
			}
		}
	}

	after := "after-" + tag
	waitFor(t, 20*time.Second, "a write through the old leader (forwarded)", func() error {
		err := old.createTemplate(after)
		if connect.CodeOf(err) == connect.CodeAlreadyExists {
			return nil // an earlier attempt committed but its answer was lost
		}
		return err
	})
	for _, s := range servers {
		waitFor(t, 20*time.Second, s.id+" applies "+after, func() error { return s.getTemplate(after, true) })
	}
	t.Logf("whole scenario took %v", time.Since(begin).Round(time.Millisecond))
}
