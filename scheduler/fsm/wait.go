package fsm

import (
	"context"
	"fmt"

	"google.golang.org/protobuf/proto"

	"github.com/sandboxhq/sandbox"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

// WaitExecution blocks until cond holds for the execution with the given id
// and returns a copy of it. It checks at once, then again after every Apply
// that changes that execution (and after a Restore). It returns an error
// wrapping sandbox.ErrNotFound if the execution does not exist, and ctx's
// error if ctx ends first. cond gets a copy it may keep.
func (f *FSM) WaitExecution(ctx context.Context, id string, cond func(*sandboxv1.Execution) bool) (*sandboxv1.Execution, error) {
	return waitFor(ctx, f, f.executionWatch, id, "execution", func() (*sandboxv1.Execution, bool) {
		e, ok := f.executions[id]
		return e, ok
	}, cond)
}

// WaitSession blocks until cond holds for the session with the given id and
// returns a copy of it, like WaitExecution.
func (f *FSM) WaitSession(ctx context.Context, id string, cond func(*sandboxv1.Session) bool) (*sandboxv1.Session, error) {
	return waitFor(ctx, f, f.sessionWatch, id, "session", func() (*sandboxv1.Session, bool) {
		s, ok := f.sessions[id]
		return s, ok
	}, cond)
}

// waitFor implements the Wait methods. get runs with f.mu held for reading,
// and the watch is registered under the same lock, so a change after the
// read always closes the watch; cond runs outside the lock, on a copy.
func waitFor[T proto.Message](ctx context.Context, f *FSM, watches map[string]*watch, id, kind string, get func() (T, bool), cond func(T) bool) (T, error) {
	var zero T
	for {
		f.mu.RLock()
		rec, ok := get()
		if !ok {
			f.mu.RUnlock()
			return zero, fmt.Errorf("%w: %s %q", sandbox.ErrNotFound, kind, id)
		}
		c := proto.CloneOf(rec)
		f.watchMu.Lock()
		w := watches[id]
		if w == nil {
			w = &watch{ch: make(chan struct{})}
			watches[id] = w
		}
		w.waiters++
		f.watchMu.Unlock()
		f.mu.RUnlock()

		if cond(c) {
			f.unwatch(watches, id, w)
			return c, nil
		}
		select {
		case <-w.ch:
			// Changed: the notifier already removed w from the map.
		case <-ctx.Done():
			f.unwatch(watches, id, w)
			return zero, fmt.Errorf("wait for %s %q: %w", kind, id, ctx.Err())
		}
	}
}

// unwatch drops one waiter from w, and w itself when it was the last one and
// no change has closed it yet.
func (f *FSM) unwatch(watches map[string]*watch, id string, w *watch) {
	f.watchMu.Lock()
	defer f.watchMu.Unlock()
	if watches[id] != w {
		return
	}
	if w.waiters--; w.waiters == 0 {
		delete(watches, id)
	}
}

// notifySession wakes whoever waits on session id. Called with f.mu held.
func (f *FSM) notifySession(id string) { f.notify(f.sessionWatch, id) }

// notifyExecution wakes whoever waits on execution id. Called with f.mu held.
func (f *FSM) notifyExecution(id string) { f.notify(f.executionWatch, id) }

func (f *FSM) notify(watches map[string]*watch, id string) {
	f.watchMu.Lock()
	defer f.watchMu.Unlock()
	if w, ok := watches[id]; ok {
		close(w.ch)
		delete(watches, id)
	}
}

// watchers reports how many watch channels are outstanding (for tests).
func (f *FSM) watchers() int {
	f.watchMu.Lock()
	defer f.watchMu.Unlock()
	return len(f.sessionWatch) + len(f.executionWatch)
}
