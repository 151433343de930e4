package membership

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
)

// settle bounds every wait for the mesh to converge. Convergence takes well
// under a second with the defaults; the bound is generous for loaded CI hosts.
const settle = 15 * time.Second

func testLogger() *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// metaBox is a Config.Meta whose value a test can change.
type metaBox struct {
	mu   sync.Mutex
	meta *agentv1.NodeMeta
}

func newMetaBox(id string) *metaBox {
	return &metaBox{meta: &agentv1.NodeMeta{
		Role:          agentv1.NodeMeta_ROLE_AGENT,
		Id:            id,
		Address:       "10.0.0.1:7000",
		CpuMillis:     4000,
		MemoryMib:     8192,
		FreeCpuMillis: 4000,
		FreeMemoryMib: 8192,
		Warm:          map[string]int32{"python-basic": 2},
		BootId:        "boot-" + id,
	}}
}

func (b *metaBox) get() *agentv1.NodeMeta {
	b.mu.Lock()
	defer b.mu.Unlock()
	return proto.Clone(b.meta).(*agentv1.NodeMeta)
}

func (b *metaBox) set(f func(*agentv1.NodeMeta)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	f(b.meta)
}

// node is a Mesh under test with the events it has seen.
type node struct {
	*Mesh
	name string
	meta *metaBox

	mu     sync.Mutex
	events []Event
}

// start starts a member named name; cfg's Name, Meta and Logger are filled in.
func start(t *testing.T, name string, cfg Config) *node {
	t.Helper()
	n := &node{name: name, meta: newMetaBox(name)}
	cfg.Name = name
	cfg.Meta = n.meta.get
	cfg.Logger = testLogger()
	m, err := New(t.Context(), cfg)
	if err != nil {
		t.Fatalf("New(%s): %v", name, err)
	}
	n.Mesh = m
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ev := range m.Events() {
			n.mu.Lock()
			n.events = append(n.events, ev)
			n.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		if err := m.Shutdown(); err != nil {
			t.Errorf("Shutdown(%s): %v", name, err)
		}
		<-done // the Events channel is closed by Shutdown
	})
	return n
}

// waitEvent waits for an event of typ about member, and returns it.
func (n *node) waitEvent(t *testing.T, typ EventType, member string) Event {
	t.Helper()
	var found Event
	poll(t, fmt.Sprintf("%s sees %s %s", n.name, member, typ), func() bool {
		n.mu.Lock()
		defer n.mu.Unlock()
		for _, ev := range n.events {
			if ev.Type == typ && ev.Member.Name == member {
				found = ev
				return true
			}
		}
		return false
	})
	return found
}

// member returns n's view of the member called name.
func (n *node) member(name string) (Member, bool) {
	for _, m := range n.Members() {
		if m.Name == name {
			return m, true
		}
	}
	return Member{}, false
}

// poll waits until cond holds, failing the test after settle.
func poll(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(settle)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting until %s", settle, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitAllAlive waits until every node sees every node alive with its meta.
func waitAllAlive(t *testing.T, nodes ...*node) {
	t.Helper()
	for _, viewer := range nodes {
		for _, want := range nodes {
			poll(t, fmt.Sprintf("%s sees %s alive with its meta", viewer.name, want.name), func() bool {
				m, ok := viewer.member(want.name)
				return ok && m.State == StateAlive && proto.Equal(m.Meta, want.meta.get())
			})
		}
	}
	for _, viewer := range nodes {
		members := viewer.Members()
		if len(members) != len(nodes) {
			t.Fatalf("%s sees %d members, want %d: %v", viewer.name, len(members), len(nodes), members)
		}
		for i := 1; i < len(members); i++ {
			if members[i-1].Name >= members[i].Name {
				t.Fatalf("%s: Members not sorted by name: %v", viewer.name, members)
			}
		}
	}
}

// mockConfig returns a Config on a transport of network.
func mockConfig(t *testing.T, network *memberlist.MockNetwork, name string, join ...string) Config {
	cfg := DefaultConfig()
	cfg.Transport = newQueuedTransport(t, network.NewTransport(name))
	cfg.Join = join
	return cfg
}

// queuedTransport makes memberlist.MockTransport usable at our probe rates.
// MockTransport delivers over unbuffered channels, and memberlist answers a
// ping from its packet-reading goroutine, so two members pinging each other
// at once deadlock (each reader blocks sending the other an ack). Here every
// member's packets and streams are drained into an unbounded queue as they
// arrive. After Shutdown they are dropped instead, the way a crashed host
// drops them (MockTransport's own Shutdown does nothing, so senders to it
// would block forever).
type queuedTransport struct {
	*memberlist.MockTransport
	packets chan *memberlist.Packet
	streams chan net.Conn
	down    chan struct{}
	once    sync.Once
}

func newQueuedTransport(t *testing.T, mt *memberlist.MockTransport) *queuedTransport {
	q := &queuedTransport{
		MockTransport: mt,
		packets:       make(chan *memberlist.Packet),
		streams:       make(chan net.Conn),
		down:          make(chan struct{}),
	}
	// Registered before the Mesh's cleanup, so this runs after it.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		relay(mt.PacketCh(), q.packets, q.down, stop, func(*memberlist.Packet) {})
	}()
	go func() {
		defer wg.Done()
		relay(mt.StreamCh(), q.streams, q.down, stop, func(c net.Conn) { c.Close() })
	}()
	t.Cleanup(func() {
		close(stop)
		wg.Wait()
	})
	return q
}

func (q *queuedTransport) PacketCh() <-chan *memberlist.Packet { return q.packets }
func (q *queuedTransport) StreamCh() <-chan net.Conn           { return q.streams }
func (q *queuedTransport) Shutdown() error {
	q.once.Do(func() { close(q.down) })
	return nil
}

// relay moves values from in to out through an unbounded queue until stop,
// discarding them once down is closed.
func relay[T any](in <-chan T, out chan<- T, down, stop <-chan struct{}, discard func(T)) {
	var queue []T
	for {
		var send chan<- T
		var head T
		if len(queue) > 0 {
			send, head = out, queue[0]
		}
		select {
		case <-stop:
			return
		case v := <-in:
			select {
			case <-down:
				discard(v)
				for _, v := range queue {
					discard(v)
				}
				queue = nil
			default:
				queue = append(queue, v)
			}
		case send <- head:
			queue = queue[1:]
		}
	}
}

// TestMockMesh runs join, meta update, an oversized update, a crash and a
// graceful leave over memberlist's in-memory transport.
func TestMockMesh(t *testing.T) {
	network := &memberlist.MockNetwork{}
	// MockNetwork is not safe for concurrent use: make every transport first.
	cfgA := mockConfig(t, network, "a")
	cfgB := mockConfig(t, network, "b")
	cfgC := mockConfig(t, network, "c")
	cfgD := mockConfig(t, network, "d")
	key := []byte("0123456789abcdef0123456789abcdef") // exercise encrypted gossip
	for _, cfg := range []*Config{&cfgA, &cfgB, &cfgC, &cfgD} {
		cfg.SecretKey = key
	}

	a := start(t, "a", cfgA)
	cfgB.Join = []string{a.LocalAddr()}
	b := start(t, "b", cfgB)
	cfgC.Join = []string{b.LocalAddr()}
	c := start(t, "c", cfgC)
	cfgD.Join = []string{a.LocalAddr()}
	d := start(t, "d", cfgD)
	waitAllAlive(t, a, b, c, d)
	for _, n := range []*node{a, b, c, d} {
		n.waitEvent(t, EventJoined, n.name) // a member sees its own join too
	}

	// A meta update reaches the others as an Updated event and in Members.
	b.meta.set(func(m *agentv1.NodeMeta) { m.FreeCpuMillis = 1500; m.Warm["nodejs-basic"] = 1 })
	if err := b.UpdateMeta(settle); err != nil {
		t.Fatalf("UpdateMeta: %v", err)
	}
	want := b.meta.get()
	for _, viewer := range []*node{a, c, d} {
		poll(t, viewer.name+" sees b's new meta", func() bool {
			viewer.mu.Lock()
			defer viewer.mu.Unlock()
			for _, ev := range viewer.events {
				if ev.Type == EventUpdated && ev.Member.Name == "b" && proto.Equal(ev.Member.Meta, want) {
					return true
				}
			}
			return false
		})
		if m, _ := viewer.member("b"); !proto.Equal(m.Meta, want) {
			t.Errorf("%s: Members has b's meta %v, want %v", viewer.name, m.Meta, want)
		}
	}

	// An update that does not fit is refused and not broadcast.
	b.meta.set(func(m *agentv1.NodeMeta) { m.BootId = strings.Repeat("x", 600) })
	if err := b.UpdateMeta(settle); !errors.Is(err, ErrMetaTooLarge) {
		t.Fatalf("UpdateMeta with 600-byte meta: err = %v, want ErrMetaTooLarge", err)
	}
	if m, _ := a.member("b"); !proto.Equal(m.Meta, want) {
		t.Errorf("a: b's meta changed to %v after a refused update", m.Meta)
	}

	// A member that stops without leaving is seen Failed.
	if err := d.Shutdown(); err != nil {
		t.Fatalf("Shutdown(d): %v", err)
	}
	for _, viewer := range []*node{a, b, c} {
		viewer.waitEvent(t, EventFailed, "d")
		if m, _ := viewer.member("d"); m.State != StateDead {
			t.Errorf("%s: Members has d in state %s, want dead", viewer.name, m.State)
		}
		assertNoEvent(t, viewer, EventLeft, "d")
	}

	// A member that leaves is seen Left, not Failed.
	if err := c.Leave(settle); err != nil {
		t.Fatalf("Leave: %v", err)
	}
	for _, viewer := range []*node{a, b} {
		ev := viewer.waitEvent(t, EventLeft, "c")
		if ev.Member.State != StateLeft {
			t.Errorf("%s: Left event with state %s", viewer.name, ev.Member.State)
		}
		if m, ok := viewer.member("c"); !ok || m.State != StateLeft {
			t.Errorf("%s: Members has c = %+v (known %v), want state left", viewer.name, m, ok)
		}
		assertNoEvent(t, viewer, EventFailed, "c")
	}
}

func assertNoEvent(t *testing.T, n *node, typ EventType, member string) {
	t.Helper()
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, ev := range n.events {
		if ev.Type == typ && ev.Member.Name == member {
			t.Errorf("%s: unexpected event %s %s", n.name, typ, member)
		}
	}
}

// freePort returns a port free for both UDP and TCP on 127.0.0.1 right now.
func freePort(t *testing.T) int {
	t.Helper()
	for range 20 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("listen: %v", err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		u, err := net.ListenPacket("udp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		l.Close()
		if err == nil {
			u.Close()
			return port
		}
	}
	t.Fatal("no port free for both UDP and TCP")
	return 0
}

func udpConfig(port int, join ...string) Config {
	cfg := DefaultConfig()
	cfg.BindAddr = "127.0.0.1"
	cfg.BindPort = port
	cfg.Join = join
	return cfg
}

// TestUDPMesh runs the mesh on real UDP/TCP sockets: a member started before
// the one it joins, a meta update, a crash (Shutdown without Leave) and a
// graceful leave.
func TestUDPMesh(t *testing.T) {
	// a starts first and joins b, which does not exist yet; b and c never
	// learn a's address, so a is in the mesh only if it retried.
	portB := freePort(t)
	addrB := net.JoinHostPort("127.0.0.1", strconv.Itoa(portB))
	a := start(t, "a", udpConfig(0, addrB))
	b := start(t, "b", udpConfig(portB))
	c := start(t, "c", udpConfig(0, addrB))
	d := start(t, "d", udpConfig(0, addrB))
	waitAllAlive(t, a, b, c, d)

	a.meta.set(func(m *agentv1.NodeMeta) { m.FreeMemoryMib = 1024 })
	if err := a.UpdateMeta(settle); err != nil {
		t.Fatalf("UpdateMeta: %v", err)
	}
	want := a.meta.get()
	for _, viewer := range []*node{b, c, d} {
		poll(t, viewer.name+" sees a's new meta", func() bool {
			m, _ := viewer.member("a")
			return proto.Equal(m.Meta, want)
		})
		viewer.waitEvent(t, EventUpdated, "a")
	}

	// A crash: d stops answering without leaving.
	crashed := time.Now()
	if err := d.Shutdown(); err != nil {
		t.Fatalf("Shutdown(d): %v", err)
	}
	for _, viewer := range []*node{a, b, c} {
		ev := viewer.waitEvent(t, EventFailed, "d")
		if ev.Member.State != StateDead {
			t.Errorf("%s: Failed event with state %s", viewer.name, ev.Member.State)
		}
		if m, _ := viewer.member("d"); m.State != StateDead {
			t.Errorf("%s: Members has d in state %s, want dead", viewer.name, m.State)
		}
	}
	t.Logf("crash of d seen Failed by all 3 others %s after Shutdown (defaults, 4 members)", time.Since(crashed).Round(time.Millisecond))

	// A graceful leave.
	if err := c.Leave(settle); err != nil {
		t.Fatalf("Leave(c): %v", err)
	}
	for _, viewer := range []*node{a, b} {
		viewer.waitEvent(t, EventLeft, "c")
		if m, _ := viewer.member("c"); m.State != StateLeft {
			t.Errorf("%s: Members has c in state %s, want left", viewer.name, m.State)
		}
		assertNoEvent(t, viewer, EventFailed, "c")
	}
}

// TestSlowConsumerLosesNoEvents fills the Events channel far past its buffer
// without reading it: memberlist must not block, and every event must arrive.
func TestSlowConsumerLosesNoEvents(t *testing.T) {
	box := newMetaBox("solo")
	cfg := mockConfig(t, &memberlist.MockNetwork{}, "solo")
	cfg.Name = "solo"
	cfg.Meta = box.get
	cfg.Logger = testLogger()
	m, err := New(t.Context(), cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = m.Shutdown() })

	const updates = 3 * eventBuffer
	for i := 1; i <= updates; i++ {
		box.set(func(meta *agentv1.NodeMeta) { meta.FreeCpuMillis = int32(i) })
		if err := m.UpdateMeta(time.Second); err != nil {
			t.Fatalf("UpdateMeta %d: %v", i, err)
		}
	}
	if ev := <-m.Events(); ev.Type != EventJoined || ev.Member.Name != "solo" {
		t.Fatalf("first event = %v %s, want joined solo", ev.Type, ev.Member.Name)
	}
	for i := 1; i <= updates; i++ {
		select {
		case ev := <-m.Events():
			if ev.Type != EventUpdated || ev.Member.Meta.GetFreeCpuMillis() != int32(i) {
				t.Fatalf("event %d = %v with free cpu %d, want updated with %d", i, ev.Type, ev.Member.Meta.GetFreeCpuMillis(), i)
			}
		case <-time.After(settle):
			t.Fatalf("event %d of %d never arrived", i, updates)
		}
	}
	if err := m.Shutdown(); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	for range m.Events() {
	}
	if err := m.UpdateMeta(time.Second); !errors.Is(err, ErrShutdown) {
		t.Errorf("UpdateMeta after Shutdown: err = %v, want ErrShutdown", err)
	}
	if err := m.Leave(time.Second); !errors.Is(err, ErrShutdown) {
		t.Errorf("Leave after Shutdown: err = %v, want ErrShutdown", err)
	}
}

func TestEncodeMeta(t *testing.T) {
	many := map[string]int32{}
	for i := range 40 {
		many[fmt.Sprintf("template-%02d", i)] = int32(i)
	}
	tests := []struct {
		name    string
		meta    *agentv1.NodeMeta
		wantErr error
	}{
		{name: "nil", meta: nil},
		{name: "agent", meta: newMetaBox("agent-1").get()},
		{name: "server", meta: &agentv1.NodeMeta{Role: agentv1.NodeMeta_ROLE_SERVER, Id: "s1", Address: "10.0.0.2:7001", ApiAddress: "10.0.0.2:8080", RaftAddress: "10.0.0.2:7002"}},
		{name: "exactly 512 bytes", meta: &agentv1.NodeMeta{BootId: strings.Repeat("x", 512-3)}},
		{name: "513 bytes", meta: &agentv1.NodeMeta{BootId: strings.Repeat("x", 512-2)}, wantErr: ErrMetaTooLarge},
		{name: "many warm templates", meta: &agentv1.NodeMeta{Id: "agent-big", Warm: many}, wantErr: ErrMetaTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := EncodeMeta(tt.meta)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("EncodeMeta: err = %v, want %v", err, tt.wantErr)
				}
				if b != nil {
					t.Errorf("EncodeMeta returned %d bytes with its error; want none (no truncation)", len(b))
				}
				if !strings.Contains(err.Error(), strconv.Itoa(memberlist.MetaMaxSize)) {
					t.Errorf("error %q does not name the %d-byte limit", err, memberlist.MetaMaxSize)
				}
				return
			}
			if err != nil {
				t.Fatalf("EncodeMeta: %v", err)
			}
			if len(b) > memberlist.MetaMaxSize {
				t.Fatalf("EncodeMeta returned %d bytes", len(b))
			}
			got, err := DecodeMeta(b)
			if err != nil {
				t.Fatalf("DecodeMeta: %v", err)
			}
			want := tt.meta
			if want == nil {
				want = &agentv1.NodeMeta{}
			}
			if !proto.Equal(got, want) {
				t.Errorf("round trip = %v, want %v", got, want)
			}
			again, _ := EncodeMeta(tt.meta)
			if string(again) != string(b) {
				t.Errorf("encoding is not deterministic")
			}
		})
	}
}

func TestNewRejects(t *testing.T) {
	tests := []struct {
		name    string
		cfg     func(*Config)
		wantErr error
	}{
		{name: "no name", cfg: func(c *Config) { c.Name = "" }},
		{name: "probe timeout not below interval", cfg: func(c *Config) { c.ProbeTimeout = c.ProbeInterval }},
		{name: "bad secret key length", cfg: func(c *Config) { c.SecretKey = []byte("short") }},
		{name: "oversized meta", cfg: func(c *Config) {
			c.Meta = func() *agentv1.NodeMeta { return &agentv1.NodeMeta{BootId: strings.Repeat("x", 600)} }
		}, wantErr: ErrMetaTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := mockConfig(t, &memberlist.MockNetwork{}, "x")
			cfg.Name = "x"
			cfg.Logger = testLogger()
			tt.cfg(&cfg)
			m, err := New(context.Background(), cfg)
			if err == nil {
				_ = m.Shutdown()
				t.Fatal("New succeeded")
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Fatalf("New: err = %v, want %v", err, tt.wantErr)
			}
		})
	}
}

func TestStrings(t *testing.T) {
	tests := []struct {
		got, want string
	}{
		{StateAlive.String(), "alive"},
		{StateSuspect.String(), "suspect"},
		{StateDead.String(), "dead"},
		{StateLeft.String(), "left"},
		{MemberState(9).String(), "MemberState(9)"},
		{EventJoined.String(), "joined"},
		{EventUpdated.String(), "updated"},
		{EventFailed.String(), "failed"},
		{EventLeft.String(), "left"},
		{EventType(9).String(), "EventType(9)"},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("String() = %q, want %q", tt.got, tt.want)
		}
	}
}

// TestLeaveIntentClassifiesDepartures drives the delegate directly through
// the orders memberlist can report in: departure with the intent already
// known, departure before the intent (a Failed corrected to Left), and a
// member that came back and then crashed (its old intent no longer counts).
func TestLeaveIntentClassifiesDepartures(t *testing.T) {
	n := start(t, "self", mockConfig(t, &memberlist.MockNetwork{}, "self"))
	d := &delegate{m: n.Mesh}
	peer := func(name string) *memberlist.Node {
		meta, _ := EncodeMeta(newMetaBox(name).get())
		return &memberlist.Node{Name: name, Addr: net.IPv4(127, 0, 0, 1), Port: 9, Meta: meta}
	}
	count := func(typ EventType, name string) int {
		n.mu.Lock()
		defer n.mu.Unlock()
		c := 0
		for _, ev := range n.events {
			if ev.Type == typ && ev.Member.Name == name {
				c++
			}
		}
		return c
	}
	state := func(name string) MemberState {
		m, _ := n.member(name)
		return m.State
	}

	// Intent first, then the departure: Left.
	d.NotifyJoin(peer("p1"))
	d.NotifyMsg(encodeIntent("p1"))
	d.NotifyLeave(peer("p1"))
	n.waitEvent(t, EventLeft, "p1")
	if got := state("p1"); got != StateLeft {
		t.Errorf("p1 state = %s, want left", got)
	}

	// Departure first, then the intent: Failed, corrected to Left once.
	d.NotifyJoin(peer("p2"))
	d.NotifyLeave(peer("p2"))
	n.waitEvent(t, EventFailed, "p2")
	d.NotifyMsg(encodeIntent("p2"))
	d.NotifyMsg(encodeIntent("p2"))
	n.waitEvent(t, EventLeft, "p2")
	if got := state("p2"); got != StateLeft {
		t.Errorf("p2 state = %s, want left", got)
	}

	// p1 comes back, then crashes: Failed.
	d.NotifyJoin(peer("p1"))
	d.NotifyLeave(peer("p1"))
	n.waitEvent(t, EventFailed, "p1")
	if got := state("p1"); got != StateDead {
		t.Errorf("p1 state after crash = %s, want dead", got)
	}

	// An intent naming this member is ignored; malformed messages too.
	d.NotifyMsg(encodeIntent("self"))
	d.NotifyMsg([]byte{msgLeaveIntent})
	d.NotifyMsg([]byte{42, 'x'})

	// Make sure every event so far was delivered before counting.
	if err := n.Leave(time.Second); err != nil {
		t.Fatalf("Leave: %v", err)
	}
	n.waitEvent(t, EventLeft, "self")
	if got := count(EventLeft, "p2"); got != 1 {
		t.Errorf("p2: %d Left events, want 1 (a repeated intent must not repeat the correction)", got)
	}
	if got := count(EventFailed, "self"); got != 0 {
		t.Errorf("self: %d Failed events after Leave, want 0", got)
	}
}

// TestShutdownStopsJoinRetry: a member whose seed never answers keeps
// retrying until Shutdown, which then returns.
func TestShutdownStopsJoinRetry(t *testing.T) {
	n := start(t, "lonely", udpConfig(0, net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort(t)))))
	if n.knowsPeer() {
		t.Fatal("lonely knows a peer")
	}
	if err := n.Shutdown(); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := n.Shutdown(); err != nil {
		t.Fatalf("second Shutdown: %v", err)
	}
}
