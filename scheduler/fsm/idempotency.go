package fsm

import (
	"google.golang.org/protobuf/types/known/timestamppb"

	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
)

// Kinds of record an idempotency key can name, as stored in
// IdempotencyRecord.kind and reported in Existing.Kind.
const (
	KindSession   = "session"
	KindExecution = "execution"
)

// Existing is the apply response of a CreateSession or CreateExecution whose
// idempotency key (scoped by tenant) was already used: the command created
// nothing, and ID names the record the key created first. It is a value,
// not an error: the caller should carry on with that record.
type Existing struct {
	// Kind is KindSession or KindExecution.
	Kind string
	ID   string
}

// idempotencyKey scopes a client's key by kind and tenant; it is the map key
// and the IdempotencyRecord.key stored in snapshots, so that Restore can
// rebuild the map from records alone. An empty client key scopes to "", which
// is never stored.
func idempotencyKey(kind, tenant, key string) string {
	if key == "" {
		return ""
	}
	return kind + "\x00" + tenant + "\x00" + key
}

// recordKey names a record in idempotencyOf.
func recordKey(kind, id string) string { return kind + "\x00" + id }

// remember records that scoped key ikey created the record kind/id. An empty
// ikey (no client key) records nothing. Called with mu held for writing.
func (f *FSM) remember(ikey, kind, id string, createdAt *timestamppb.Timestamp) {
	if ikey == "" {
		return
	}
	f.idempotency[ikey] = &statev1.IdempotencyRecord{Key: ikey, Kind: kind, Id: id, CreatedAt: createdAt}
	f.idempotencyOf[recordKey(kind, id)] = ikey
}

// forget drops the idempotency record naming kind/id, if there is one.
// Called with mu held for writing.
func (f *FSM) forget(kind, id string) {
	rk := recordKey(kind, id)
	if ikey, ok := f.idempotencyOf[rk]; ok {
		delete(f.idempotency, ikey)
		delete(f.idempotencyOf, rk)
	}
}

// IdempotentID returns the id of the record of the given kind (KindSession or
// KindExecution) that tenant's idempotency key created, if the key is known.
func (f *FSM) IdempotentID(kind, tenant, key string) (string, bool) {
	ikey := idempotencyKey(kind, tenant, key)
	if ikey == "" {
		return "", false
	}
	f.mu.RLock()
	defer f.mu.RUnlock()
	r, ok := f.idempotency[ikey]
	if !ok {
		return "", false
	}
	return r.GetId(), true
}
