// Package membership is the gossip mesh that servers and agents share: every
// member advertises a sandbox.agent.v1.NodeMeta (its role, addresses,
// capacity and warm pools) and learns who else is alive, who failed and who
// left. It wraps hashicorp/memberlist (SWIM) with LAN-tuned failure detection
// and a non-blocking event stream.
package membership

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
)

// ErrShutdown is returned by calls made after Shutdown.
var ErrShutdown = errors.New("membership: mesh is shut down")

// eventBuffer is the capacity of the Events channel. Events that do not fit
// wait in the Mesh's own unbounded queue (see eventQueue).
const eventBuffer = 64

// DefaultBroadcastTimeout is how long UpdateMeta and Leave wait for their
// broadcast when given no timeout.
const DefaultBroadcastTimeout = 5 * time.Second

// Join retry backoff: the first retry comes quickly because peers usually
// start within a second of each other; later ones back off so a member whose
// peers are all down does not spin.
const (
	joinBackoffMin = 100 * time.Millisecond
	joinBackoffMax = 5 * time.Second
)

// Config configures a Mesh. Start from DefaultConfig.
type Config struct {
	// Name is the member's unique name: the server or agent id.
	Name string
	// BindAddr and BindPort are where the gossip listeners (UDP and TCP, same
	// port) bind. BindPort 0 picks a free port.
	BindAddr string
	BindPort int
	// AdvertiseAddr and AdvertisePort are the address other members use to
	// reach this one, when it differs from the bind address (NAT, 0.0.0.0).
	// AdvertisePort 0 means the bound port.
	AdvertiseAddr string
	AdvertisePort int
	// Join lists host:port gossip addresses of members to join at start.
	// Joining is retried with backoff in the background until one of them
	// answers (or the context given to New ends), so members may start in any
	// order. This member's own address is skipped.
	Join []string
	// Meta returns what this member advertises. memberlist calls it from its
	// own goroutines whenever it needs this node's meta (start, UpdateMeta,
	// refutes), so it must be fast and safe for concurrent use, and must not
	// call back into the Mesh's memberlist-facing methods (UpdateMeta, Leave,
	// Shutdown). Nil advertises no meta. Its encoding must fit in
	// memberlist.MetaMaxSize (512) bytes; see EncodeMeta.
	Meta func() *agentv1.NodeMeta

	// Failure detection, tuned for a LAN; see DefaultConfig for the values
	// and why. Zero fields take the defaults.
	//
	// ProbeInterval is how often this member probes a (round-robin) peer.
	ProbeInterval time.Duration
	// ProbeTimeout is how long a direct probe waits for an ack before asking
	// other members to probe indirectly. It must be below ProbeInterval.
	ProbeTimeout time.Duration
	// GossipInterval is how often queued state changes are gossiped.
	GossipInterval time.Duration
	// SuspicionMult scales how long a member stays suspect before it is
	// declared dead: SuspicionMult * max(1, log10(members)) * ProbeInterval.
	SuspicionMult int
	// PushPullInterval is how often this member exchanges its full state
	// with a random member. It repairs what gossip missed, which bounds how
	// stale a view can get: a member that joined at the same moment as
	// another, or a meta update whose few retransmissions were lost.
	PushPullInterval time.Duration

	// SecretKey, when set, encrypts and authenticates all gossip with
	// AES-GCM (16, 24 or 32 bytes; the same on every member). Without it any
	// host that can reach the gossip port can join the mesh and advertise
	// itself as an agent, so production deployments should derive one from
	// the cluster token.
	SecretKey []byte

	// Transport replaces the UDP/TCP transport (BindAddr and BindPort are then
	// unused); tests pass transports from memberlist.MockNetwork.
	Transport memberlist.Transport
	// Logger receives the Mesh's logs; memberlist's own log lines are routed
	// into it at debug level. Nil means slog.Default().
	Logger *slog.Logger
}

// DefaultConfig returns a Config with LAN-tuned failure detection:
//
//   - ProbeInterval 200ms (memberlist's LAN default is 1s). Every live member
//     probes one peer per interval, going round its shuffled peer list, so
//     some member probes a crashed one within about one interval.
//   - ProbeTimeout 100ms (LAN default 500ms). LAN round trips are well under
//     a millisecond, but on a loaded 2-core host scheduling and GC can delay
//     an ack by tens of milliseconds; 100ms is twice the 50ms measured in the
//     platform notes, to keep false suspicions rare, and still leaves half the
//     probe interval for the indirect probes.
//   - SuspicionMult 2 (LAN default 4): a suspect is declared dead after
//     2*max(1,log10(n))*200ms, i.e. 400ms up to 10 members, 520ms at 20.
//     With a multiplier of 2 memberlist needs no independent confirmations
//     (it asks for SuspicionMult-2), so that minimum applies directly.
//   - GossipInterval 100ms (LAN default 200ms): a suspicion reaches the
//     suspect, and its refutation reaches everyone, in a few rounds, well
//     within the suspicion timeout, so a slow-but-alive member clears itself
//     before it is declared dead.
//   - PushPullInterval 5s (LAN default 30s): two members that join through
//     different seeds at the same moment may miss each other's gossip; this
//     bounds how long until they meet, and how long a lost meta update
//     (capacity, warm pools) stays stale. A full-state exchange at 20 members
//     is about 15 KB over TCP, so one per member every 5s costs little.
//
// The platform notes measured about 1.3s crash detection at 20 nodes with
// 200ms/50ms/2 against about 7s with memberlist's LAN defaults. Detecting a
// crashed agent fast matters because its sessions are lost until the leader
// marks them LOST and refills warm pools elsewhere; the price is a few
// hundred small UDP packets per second across the mesh.
func DefaultConfig() Config {
	return Config{
		BindAddr:         "0.0.0.0",
		BindPort:         7946,
		ProbeInterval:    200 * time.Millisecond,
		ProbeTimeout:     100 * time.Millisecond,
		SuspicionMult:    2,
		GossipInterval:   100 * time.Millisecond,
		PushPullInterval: 5 * time.Second,
	}
}

// Mesh is this process's membership in the gossip mesh.
type Mesh struct {
	cfg       Config
	log       *slog.Logger
	ml        *memberlist.Memberlist
	localAddr string
	// deadRetention is how long memberlist remembers dead and left members
	// (its GossipToTheDeadTime); Members reports them for as long.
	deadRetention time.Duration

	metaMu   sync.Mutex
	lastMeta []byte // last meta that encoded within the limit

	mu      sync.Mutex
	members map[string]memberEntry
	intents map[string]time.Time // leave intents received, by member name; see leave.go

	alive      atomic.Int32 // live members, this one included: sizes gossip retransmits
	leaving    atomic.Bool  // Leave was called
	broadcasts *memberlist.TransmitLimitedQueue

	queue  *eventQueue
	events chan Event

	lifeMu     sync.Mutex // serialises Leave and Shutdown (memberlist panics on Leave after Shutdown)
	shut       bool
	stop       chan struct{} // closed by Shutdown
	cancelJoin context.CancelFunc
	wg         sync.WaitGroup
}

// memberEntry is a member as last reported by memberlist's event callbacks.
type memberEntry struct {
	member Member
	since  time.Time // when the state last changed
}

// New creates the local member, starts gossiping, and starts joining
// cfg.Join in the background. ctx bounds only that background joining; the
// mesh runs until Shutdown.
func New(ctx context.Context, cfg Config) (*Mesh, error) {
	if cfg.Name == "" {
		return nil, errors.New("membership: Config.Name is required")
	}
	def := DefaultConfig()
	if cfg.ProbeInterval <= 0 {
		cfg.ProbeInterval = def.ProbeInterval
	}
	if cfg.ProbeTimeout <= 0 {
		cfg.ProbeTimeout = def.ProbeTimeout
	}
	if cfg.GossipInterval <= 0 {
		cfg.GossipInterval = def.GossipInterval
	}
	if cfg.SuspicionMult <= 0 {
		cfg.SuspicionMult = def.SuspicionMult
	}
	if cfg.PushPullInterval <= 0 {
		cfg.PushPullInterval = def.PushPullInterval
	}
	if cfg.ProbeTimeout >= cfg.ProbeInterval {
		return nil, fmt.Errorf("membership: ProbeTimeout %s must be below ProbeInterval %s", cfg.ProbeTimeout, cfg.ProbeInterval)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	logger := cfg.Logger.With("member", cfg.Name)

	m := &Mesh{
		cfg:     cfg,
		log:     logger,
		members: make(map[string]memberEntry),
		intents: make(map[string]time.Time),
		queue:   newEventQueue(),
		events:  make(chan Event, eventBuffer),
		stop:    make(chan struct{}),
	}
	// Fail now, not inside memberlist (which panics on oversized meta).
	if cfg.Meta != nil {
		b, err := EncodeMeta(cfg.Meta())
		if err != nil {
			return nil, err
		}
		m.lastMeta = b
	}

	mlc := memberlist.DefaultLANConfig()
	mlc.Name = cfg.Name
	mlc.BindAddr = cfg.BindAddr
	mlc.BindPort = cfg.BindPort
	mlc.AdvertiseAddr = cfg.AdvertiseAddr
	mlc.AdvertisePort = cfg.AdvertisePort
	if mlc.AdvertisePort == 0 {
		mlc.AdvertisePort = cfg.BindPort // memberlist replaces it when BindPort is 0
	}
	mlc.ProbeInterval = cfg.ProbeInterval
	mlc.ProbeTimeout = cfg.ProbeTimeout
	mlc.GossipInterval = cfg.GossipInterval
	mlc.SuspicionMult = cfg.SuspicionMult
	mlc.PushPullInterval = cfg.PushPullInterval
	mlc.SecretKey = cfg.SecretKey
	// A member that restarts on another address (port 0) may take its name
	// back once its old self is dead; memberlist's default never allows it.
	mlc.DeadNodeReclaimTime = time.Second
	mlc.Transport = cfg.Transport
	d := &delegate{m: m}
	mlc.Delegate = d
	mlc.Events = d
	mlc.Logger = slog.NewLogLogger(logger.With("component", "memberlist").Handler(), slog.LevelDebug)
	m.deadRetention = mlc.GossipToTheDeadTime
	m.broadcasts = &memberlist.TransmitLimitedQueue{
		NumNodes:       func() int { return int(m.alive.Load()) },
		RetransmitMult: mlc.RetransmitMult,
	}

	ml, err := memberlist.Create(mlc)
	if err != nil {
		return nil, fmt.Errorf("membership: start member %q: %w", cfg.Name, err)
	}
	m.ml = ml
	// memberlist announced the local node to the event delegate while
	// creating it; its advertised address never changes afterwards.
	m.mu.Lock()
	m.localAddr = m.members[cfg.Name].member.Addr
	m.mu.Unlock()

	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		m.queue.pump(m.events, m.stop)
	}()

	joinCtx, cancel := context.WithCancel(ctx)
	m.cancelJoin = cancel
	if seeds := m.seeds(); len(seeds) > 0 {
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			m.joinLoop(joinCtx, seeds)
		}()
	}
	logger.Info("membership: started", "addr", m.localAddr, "join", cfg.Join)
	return m, nil
}

// seeds returns cfg.Join without this member's own address: joining oneself
// "succeeds" and would stop the retries before any peer was reached.
func (m *Mesh) seeds() []string {
	var out []string
	for _, s := range m.cfg.Join {
		if s == m.localAddr || s == net.JoinHostPort(m.cfg.BindAddr, m.localPort()) {
			continue
		}
		out = append(out, s)
	}
	return out
}

func (m *Mesh) localPort() string {
	_, port, _ := net.SplitHostPort(m.localAddr)
	return port
}

// joinLoop joins seeds, retrying with exponential backoff until one answers
// and this member knows at least one other live member, or ctx ends.
func (m *Mesh) joinLoop(ctx context.Context, seeds []string) {
	backoff := joinBackoffMin
	for attempt := 1; ; attempt++ {
		n, err := m.ml.Join(seeds)
		if n > 0 && m.knowsPeer() {
			m.log.Info("membership: joined", "contacted", n, "attempts", attempt)
			return
		}
		// Say so early, then only now and then: a member may legitimately wait
		// a long time for the first of its peers.
		if attempt == 1 || attempt%20 == 0 {
			m.log.Warn("membership: join failed, retrying", "seeds", seeds, "attempt", attempt, "err", err)
		} else {
			m.log.Debug("membership: join failed, retrying", "seeds", seeds, "attempt", attempt, "err", err)
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		backoff = min(2*backoff, joinBackoffMax)
	}
}

// knowsPeer reports whether another member is alive in this member's view.
func (m *Mesh) knowsPeer() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for name, e := range m.members {
		if name != m.cfg.Name && e.member.State == StateAlive {
			return true
		}
	}
	return false
}

// Members returns every member this one knows, itself included, sorted by
// name: the live ones, and the dead and left ones for as long as memberlist
// remembers them (30s).
//
// States come from memberlist's event callbacks, the only place it exposes
// node state under its lock. memberlist v0.5.4 has no callback for
// suspicion (and reading its Members() structs races with its writers), so a
// suspected member is reported Alive until it is declared Dead; StateSuspect
// is never reported.
func (m *Mesh) Members() []Member {
	now := time.Now()
	m.mu.Lock()
	out := make([]Member, 0, len(m.members))
	for name, e := range m.members {
		if e.member.State != StateAlive && now.Sub(e.since) > m.deadRetention {
			delete(m.members, name)
			continue
		}
		out = append(out, cloneMember(e.member))
	}
	m.pruneIntentsLocked(now)
	m.mu.Unlock()
	slices.SortFunc(out, func(a, b Member) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// Events returns the membership changes this member observes, its own
// included (its Joined at start, its Updated after UpdateMeta), in the order
// memberlist reported them. The channel is buffered; when the consumer falls
// behind, further events wait in an unbounded queue owned by the Mesh, so
// memberlist's goroutines never block and no event (above all no Failed) is
// dropped. The channel is closed by Shutdown; events still queued then are
// discarded. There is one channel: consume it from one place.
func (m *Mesh) Events() <-chan Event {
	return m.events
}

// UpdateMeta re-reads Config.Meta and broadcasts it, waiting up to timeout
// (<= 0: DefaultBroadcastTimeout) for the broadcast to go out, if any other
// member is alive. On timeout the update still spreads; only the wait ended.
// It fails with ErrMetaTooLarge, broadcasting nothing, when the meta does not
// fit.
func (m *Mesh) UpdateMeta(timeout time.Duration) error {
	m.lifeMu.Lock()
	defer m.lifeMu.Unlock()
	if m.shut {
		return ErrShutdown
	}
	if m.cfg.Meta != nil {
		if _, err := EncodeMeta(m.cfg.Meta()); err != nil {
			return err
		}
	}
	if timeout <= 0 {
		timeout = DefaultBroadcastTimeout
	}
	if err := m.ml.UpdateNode(timeout); err != nil {
		return fmt.Errorf("membership: broadcast meta of %q: %w", m.cfg.Name, err)
	}
	return nil
}

// LocalAddr returns this member's advertised gossip address, host:port: the
// address others put in their Config.Join.
func (m *Mesh) LocalAddr() string {
	return m.localAddr
}

// Leave tells the mesh this member is leaving on purpose, so the others see
// Left rather than Failed. It sends a leave intent to every live member and
// gossips it too, then gossips memberlist's leave message, waiting up to
// timeout in all (<= 0: DefaultBroadcastTimeout) for them to go out. The
// member keeps answering gossip until Shutdown, which should follow; it
// cannot rejoin without a new Mesh.
func (m *Mesh) Leave(timeout time.Duration) error {
	m.lifeMu.Lock()
	defer m.lifeMu.Unlock()
	if m.shut {
		return ErrShutdown
	}
	if timeout <= 0 {
		timeout = DefaultBroadcastTimeout
	}
	deadline := time.Now().Add(timeout)
	m.leaving.Store(true)
	var errs []error
	m.sendIntent()
	if m.alive.Load() > 1 && !m.broadcastIntent(deadline) {
		// Leave anyway: members that miss the intent will report Failed.
		errs = append(errs, fmt.Errorf("membership: leave as %q: timeout after %s waiting for the leave intent broadcast", m.cfg.Name, timeout))
	}
	// memberlist queues its leave message even when its wait times out.
	if err := m.ml.Leave(max(time.Until(deadline), time.Millisecond)); err != nil {
		errs = append(errs, fmt.Errorf("membership: leave as %q: %w", m.cfg.Name, err))
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	m.log.Info("membership: left")
	return nil
}

// Shutdown stops gossiping and closes the Events channel. Without a Leave
// first, the others declare this member Failed once it stops answering
// probes. Shutdown waits for the background join to stop (at most
// memberlist's TCP timeout, 10s, if a seed is unreachable mid-dial). Calling
// it again does nothing.
func (m *Mesh) Shutdown() error {
	m.lifeMu.Lock()
	defer m.lifeMu.Unlock()
	if m.shut {
		return nil
	}
	m.shut = true
	m.cancelJoin()
	err := m.ml.Shutdown()
	m.queue.stop()
	close(m.stop)
	m.wg.Wait()
	if err != nil {
		return fmt.Errorf("membership: shut down %q: %w", m.cfg.Name, err)
	}
	m.log.Info("membership: shut down")
	return nil
}

// change is what memberlist reported about a member.
type change int

const (
	changeJoin change = iota
	changeUpdate
	changeLeave
)

// observe records a membership change reported by memberlist and queues its
// event. memberlist calls it with its node lock held, one call at a time, so
// it must not block or call into memberlist.
func (m *Mesh) observe(c change, n *memberlist.Node) {
	member := Member{
		Name: n.Name,
		Addr: net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port))),
	}
	meta, err := DecodeMeta(n.Meta)
	if err != nil {
		m.log.Error("membership: undecodable node meta", "peer", n.Name, "err", err)
	} else {
		member.Meta = meta
	}

	now := time.Now()
	var typ EventType
	m.mu.Lock()
	switch c {
	case changeJoin:
		typ, member.State = EventJoined, StateAlive
		delete(m.intents, n.Name) // it came back: an old intent no longer applies
	case changeUpdate:
		typ, member.State = EventUpdated, StateAlive
	case changeLeave:
		// n.State cannot tell Left from Dead in memberlist v0.5.4; see leave.go.
		_, intended := m.intents[n.Name]
		if n.Name == m.cfg.Name {
			intended = m.leaving.Load()
		}
		if intended {
			typ, member.State = EventLeft, StateLeft
		} else {
			typ, member.State = EventFailed, StateDead
		}
	}
	m.members[n.Name] = memberEntry{member: member, since: now}
	var alive int32
	for _, e := range m.members {
		if e.member.State == StateAlive {
			alive++
		}
	}
	m.alive.Store(alive)
	m.mu.Unlock()

	m.queue.push(Event{Type: typ, Member: cloneMember(member)})

	attrs := []any{"peer", n.Name, "addr", member.Addr}
	if typ == EventUpdated {
		m.log.Debug("membership: member updated", attrs...)
	} else {
		m.log.Info("membership: member "+typ.String(), attrs...)
	}
}

// pruneIntentsLocked forgets leave intents older than memberlist's memory of
// dead members. m.mu must be held.
func (m *Mesh) pruneIntentsLocked(now time.Time) {
	for name, at := range m.intents {
		if now.Sub(at) > m.deadRetention {
			delete(m.intents, name)
		}
	}
}

// cloneMember copies m so callers may modify the meta they receive.
func cloneMember(m Member) Member {
	if m.Meta != nil {
		m.Meta = proto.Clone(m.Meta).(*agentv1.NodeMeta)
	}
	return m
}

// delegate adapts the Mesh to memberlist's Delegate and EventDelegate, which
// keeps those methods out of the Mesh's API.
type delegate struct {
	m *Mesh
}

// NodeMeta returns this node's encoded meta. memberlist panics on meta over
// limit, so when Config.Meta has grown too large the last meta that fitted
// is advertised instead and the error is logged (UpdateMeta reports it to
// its caller).
func (d *delegate) NodeMeta(limit int) []byte {
	m := d.m
	if m.cfg.Meta == nil {
		return nil
	}
	b, err := EncodeMeta(m.cfg.Meta())
	m.metaMu.Lock()
	defer m.metaMu.Unlock()
	if err == nil && len(b) > limit {
		err = fmt.Errorf("membership: node meta is %d bytes, memberlist asked for at most %d: %w", len(b), limit, ErrMetaTooLarge)
	}
	if err != nil {
		m.log.Error("membership: advertising previous node meta", "err", err)
		return m.lastMeta
	}
	m.lastMeta = b
	return b
}

// NotifyMsg receives user messages: the only kind is a leave intent.
func (d *delegate) NotifyMsg(msg []byte) {
	if len(msg) > 1 && msg[0] == msgLeaveIntent {
		d.m.receiveIntent(msg)
	}
}

// GetBroadcasts hands memberlist the queued leave intents to piggyback.
func (d *delegate) GetBroadcasts(overhead, limit int) [][]byte {
	return d.m.broadcasts.GetBroadcasts(overhead, limit)
}

// LocalState has no user state to push/pull.
func (d *delegate) LocalState(bool) []byte { return nil }

// MergeRemoteState has no user state to merge.
func (d *delegate) MergeRemoteState([]byte, bool) {}

// NotifyJoin reports a member that appeared or came back.
func (d *delegate) NotifyJoin(n *memberlist.Node) { d.m.observe(changeJoin, n) }

// NotifyUpdate reports a live member's new meta.
func (d *delegate) NotifyUpdate(n *memberlist.Node) { d.m.observe(changeUpdate, n) }

// NotifyLeave reports a member gone, left or failed.
func (d *delegate) NotifyLeave(n *memberlist.Node) { d.m.observe(changeLeave, n) }
