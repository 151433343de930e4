package membership

import (
	"fmt"
	"sync"

	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
)

// MemberState is a member's state as this node sees it.
type MemberState int

const (
	// StateAlive: the member answers probes.
	StateAlive MemberState = iota
	// StateSuspect: the member missed probes and may be declared dead soon.
	// See Mesh.Members for why this version never reports it.
	StateSuspect
	// StateDead: the mesh declared the member failed.
	StateDead
	// StateLeft: the member left the mesh on purpose.
	StateLeft
)

// String returns the state's name.
func (s MemberState) String() string {
	switch s {
	case StateAlive:
		return "alive"
	case StateSuspect:
		return "suspect"
	case StateDead:
		return "dead"
	case StateLeft:
		return "left"
	default:
		return fmt.Sprintf("MemberState(%d)", int(s))
	}
}

// Member is one member of the mesh.
type Member struct {
	// Name is the member's unique name: a server or agent id.
	Name string
	// Addr is the member's gossip address, host:port.
	Addr  string
	State MemberState
	// Meta is what the member advertises; nil if its metadata does not
	// decode (the error is logged).
	Meta *agentv1.NodeMeta
}

// EventType says what happened to a member.
type EventType int

const (
	// EventJoined: a member appeared, or came back after being dead or gone.
	EventJoined EventType = iota
	// EventUpdated: a live member changed its meta.
	EventUpdated
	// EventFailed: the mesh declared the member dead (it stopped answering
	// probes, e.g. it crashed or was shut down without leaving).
	EventFailed
	// EventLeft: the member left on purpose (Mesh.Leave). It may follow an
	// EventFailed for the same member when the member's leave intent reached
	// this node after its departure did; it then corrects that Failed.
	EventLeft
)

// String returns the event type's name.
func (t EventType) String() string {
	switch t {
	case EventJoined:
		return "joined"
	case EventUpdated:
		return "updated"
	case EventFailed:
		return "failed"
	case EventLeft:
		return "left"
	default:
		return fmt.Sprintf("EventType(%d)", int(t))
	}
}

// Event is a change in membership, with the member as it was right after the
// change.
type Event struct {
	Type   EventType
	Member Member
}

// eventQueue is an unbounded FIFO between memberlist's delegate callbacks,
// which must never block, and the Events channel, which a slow consumer may
// leave full. Membership changes are few (one per join, failure, leave or
// meta change), so the queue stays small unless the consumer stops reading
// altogether; dropping instead would lose a Failed event and with it the
// sessions the scheduler must mark LOST.
type eventQueue struct {
	mu      sync.Mutex
	items   []Event
	wake    chan struct{} // capacity 1: "items is not empty"
	stopped bool
}

func newEventQueue() *eventQueue {
	return &eventQueue{wake: make(chan struct{}, 1)}
}

// push appends ev without blocking.
func (q *eventQueue) push(ev Event) {
	q.mu.Lock()
	if q.stopped {
		q.mu.Unlock()
		return
	}
	q.items = append(q.items, ev)
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// popAll takes every queued event.
func (q *eventQueue) popAll() []Event {
	q.mu.Lock()
	defer q.mu.Unlock()
	items := q.items
	q.items = nil
	return items
}

// stop discards queued events and makes push a no-op.
func (q *eventQueue) stop() {
	q.mu.Lock()
	q.stopped = true
	q.items = nil
	q.mu.Unlock()
}

// pump moves events from q to out until stop is closed, then closes out.
// It is the only sender on out.
func (q *eventQueue) pump(out chan<- Event, stop <-chan struct{}) {
	defer close(out)
	for {
		select {
		case <-stop:
			return
		case <-q.wake:
		}
		for _, ev := range q.popAll() {
			select {
			case out <- ev:
			case <-stop:
				return
			}
		}
	}
}
