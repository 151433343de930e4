package membership

import (
	"time"

	"github.com/hashicorp/memberlist"
)

// Telling Left from Failed.
//
// memberlist v0.5.4 knows whether a member left (it sent its own "dead"
// message) or failed (others declared it dead), but does not tell the event
// delegate: the *Node given to NotifyLeave carries a State field that
// memberlist never writes, because its internal nodeState shadows it
// (hashicorp/memberlist#293; the fix, #321, is unreleased). So the Mesh does
// what Serf does: before leaving, a member gossips a leave intent naming
// itself; members that received it record it and report that member's
// departure as Left, and all others as Failed. Each member re-gossips an
// intent the first time it sees it, so the intent spreads like memberlist's
// own messages; the leaving member also sends it straight to every member it
// knows alive first, so that it normally arrives before the leave itself. If
// an intent arrives after the departure was already
// reported Failed (the dead message outran it), an EventLeft corrects it.

// msgLeaveIntent starts a leave-intent user message; the rest is the name of
// the member leaving.
const msgLeaveIntent byte = 1

func encodeIntent(name string) []byte {
	return append([]byte{msgLeaveIntent}, name...)
}

// intentBroadcast is a leave intent in memberlist's broadcast queue.
type intentBroadcast struct {
	name   string
	msg    []byte
	notify chan struct{} // closed when sent often enough; nil when nobody waits
}

var _ memberlist.NamedBroadcast = (*intentBroadcast)(nil)

// Invalidates replaces a queued intent for the same member.
func (b *intentBroadcast) Invalidates(other memberlist.Broadcast) bool {
	o, ok := other.(memberlist.NamedBroadcast)
	return ok && o.Name() == b.Name()
}

// Name identifies the intent in the queue.
func (b *intentBroadcast) Name() string { return "leave-intent:" + b.name }

// Message returns the encoded intent.
func (b *intentBroadcast) Message() []byte { return b.msg }

// Finished is called once, when the queue stops sending the intent.
func (b *intentBroadcast) Finished() {
	if b.notify != nil {
		close(b.notify)
	}
}

// receiveIntent records a leave intent gossiped by another member, corrects
// an earlier Failed for it, and re-gossips it once.
func (m *Mesh) receiveIntent(msg []byte) {
	name := string(msg[1:])
	if name == "" || name == m.cfg.Name {
		return
	}
	now := time.Now()
	var correction *Event
	m.mu.Lock()
	if _, seen := m.intents[name]; seen {
		m.mu.Unlock()
		return
	}
	m.intents[name] = now
	if e, ok := m.members[name]; ok && e.member.State == StateDead {
		e.member.State = StateLeft
		e.since = now
		m.members[name] = e
		correction = &Event{Type: EventLeft, Member: cloneMember(e.member)}
	}
	m.mu.Unlock()

	if correction != nil {
		m.queue.push(*correction)
		m.log.Info("membership: member left (intent arrived after it was declared failed)", "peer", name)
	}
	m.broadcasts.QueueBroadcast(&intentBroadcast{name: name, msg: encodeIntent(name)})
}

// broadcastIntent gossips this member's leave intent and waits until it has
// been sent to enough members, or until deadline (zero: no limit). It
// reports whether the intent went out in time.
func (m *Mesh) broadcastIntent(deadline time.Time) bool {
	notify := make(chan struct{})
	m.broadcasts.QueueBroadcast(&intentBroadcast{name: m.cfg.Name, msg: encodeIntent(m.cfg.Name), notify: notify})
	if deadline.IsZero() {
		<-notify
		return true
	}
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-notify:
		return true
	case <-t.C:
		return false
	}
}

// sendIntent sends this member's leave intent straight to every live peer,
// one UDP packet each (no dialing, so it never blocks on a dead peer).
func (m *Mesh) sendIntent() {
	var peers []memberlist.Address
	m.mu.Lock()
	for name, e := range m.members {
		if name != m.cfg.Name && e.member.State == StateAlive {
			peers = append(peers, memberlist.Address{Addr: e.member.Addr, Name: name})
		}
	}
	m.mu.Unlock()
	msg := encodeIntent(m.cfg.Name)
	for _, p := range peers {
		if err := m.ml.SendToAddress(p, msg); err != nil {
			m.log.Debug("membership: send leave intent", "peer", p.Name, "err", err)
		}
	}
}
