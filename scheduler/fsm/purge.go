package fsm

import (
	"github.com/sandboxhq/sandbox"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
)

// Purged is the apply response of PurgeSessions: how many sessions, and
// executions of theirs, it deleted.
type Purged struct {
	Sessions   int
	Executions int
}

// purgeSessions deletes ended sessions with their executions and idempotency
// records. An id that is unknown or still live is skipped rather than
// refused, so that one stale id in a batch does not hold back the rest.
func (f *FSM) purgeSessions(m *statev1.PurgeSessions) any {
	var p Purged
	for _, sid := range m.GetSessionIds() {
		s, ok := f.sessions[sid]
		if !ok {
			f.logger.Debug("purge: skipping unknown session", "session_id", sid)
			continue
		}
		if st := sandbox.SessionState(s.GetState()); !st.Terminal() {
			f.logger.Debug("purge: skipping session that has not ended", "session_id", sid, "state", st)
			continue
		}
		for eid := range f.bySession[sid] {
			delete(f.executions, eid)
			f.forget(KindExecution, eid)
			f.notifyExecution(eid)
			p.Executions++
		}
		delete(f.bySession, sid)
		f.account(s, -1) // a terminal session holds nothing; kept for symmetry
		delete(f.sessions, sid)
		f.forget(KindSession, sid)
		f.notifySession(sid)
		p.Sessions++
	}
	f.logger.Debug("purged sessions", "requested", len(m.GetSessionIds()),
		"sessions", p.Sessions, "executions", p.Executions)
	return p
}
