// Package state is the agent's own small durable store: which container
// serves which session, with what a restarted agent needs to re-adopt it, and
// the highest fence term the agent has seen from the servers.
//
// It is one bbolt file, <DataDir>/agent.db, with this bucket layout:
//
//	v2                              schema version 2; a new layout gets a new top-level bucket
//	├── meta
//	│   ├── "schema"     -> "2"
//	│   └── "fence_term" -> uint64, 8 bytes big-endian; absent means 0
//	└── sessions
//	    └── <session id> -> JSON Session {session_id, container_id, template_id, image, token,
//	                        socket_dir, limits{cpu_millis, memory_mib, pids, disk_mib,
//	                        max_execution_timeout_seconds}, pending_execution_ids, created_at}
//
// Migrations run in Open, in one transaction, and delete the old top-level
// bucket once its contents are copied:
//
//	v1 -> v2   sessions are copied unchanged (a v1 session has no socket_dir,
//	           limits or pending executions: the agent fills in the default
//	           socket directory); v1 had no fence term.
//
// The file holds the sessions' callback tokens, so it is created mode 0600.
package state

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"time"

	bolt "go.etcd.io/bbolt"
)

var (
	bucketV1       = []byte("v1")
	bucketV2       = []byte("v2")
	bucketMeta     = []byte("meta")
	bucketSessions = []byte("sessions")
	keySchema      = []byte("schema")
	keyFenceTerm   = []byte("fence_term")
)

const schemaVersion = "2"

// ErrNotFound is returned for a session the store does not hold.
var ErrNotFound = errors.New("session not recorded")

// Session is what the agent records for one session's container: enough to
// take it back after a restart.
type Session struct {
	SessionID   string `json:"session_id"`
	ContainerID string `json:"container_id"`
	TemplateID  string `json:"template_id"`
	Image       string `json:"image"`
	// Token is the session's callback token, which its executor presents.
	Token string `json:"token"`
	// SocketDir is the host directory bound into the container; empty in
	// records migrated from v1.
	SocketDir string `json:"socket_dir,omitempty"`
	Limits    Limits `json:"limits"`
	// PendingExecutionIDs are the executions handed to the executor whose
	// result has not been relayed yet, sorted.
	PendingExecutionIDs []string  `json:"pending_execution_ids,omitempty"`
	CreatedAt           time.Time `json:"created_at"`
}

// Limits are the resource limits the session's container was started with.
// The store has its own type so the file format does not follow renames in
// the domain package.
type Limits struct {
	CPUMillis                  int32 `json:"cpu_millis,omitempty"`
	MemoryMiB                  int64 `json:"memory_mib,omitempty"`
	Pids                       int32 `json:"pids,omitempty"`
	DiskMiB                    int64 `json:"disk_mib,omitempty"`
	MaxExecutionTimeoutSeconds int32 `json:"max_execution_timeout_seconds,omitempty"`
}

// Store is the agent's bbolt store.
type Store struct {
	db *bolt.DB
}

// Open opens (creating if needed) the store at path and migrates an older
// layout to the current one.
func Open(path string) (*Store, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("open agent state %s: %w", path, err)
	}
	if err := db.Update(setup); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("open agent state %s: %w", path, err)
	}
	// Session records are written in batches: a burst of session starts
	// shares one fsync per batch instead of queueing for one each. A record
	// is written beside the executor's init, which takes longer than the delay.
	db.MaxBatchDelay = batchDelay
	return &Store{db: db}, nil
}

// setup creates the v2 layout and migrates a v1 one into it.
func setup(tx *bolt.Tx) error {
	v2, err := tx.CreateBucketIfNotExists(bucketV2)
	if err != nil {
		return err
	}
	meta, err := v2.CreateBucketIfNotExists(bucketMeta)
	if err != nil {
		return err
	}
	if v := meta.Get(keySchema); v != nil && string(v) != schemaVersion {
		return fmt.Errorf("unknown schema %q", v)
	}
	if err := meta.Put(keySchema, []byte(schemaVersion)); err != nil {
		return err
	}
	sess, err := v2.CreateBucketIfNotExists(bucketSessions)
	if err != nil {
		return err
	}
	return migrateV1(tx, sess)
}

// migrateV1 copies v1's sessions into v2 and deletes v1. A v1 record is
// valid v2 JSON: the fields v2 added are optional.
func migrateV1(tx *bolt.Tx, into *bolt.Bucket) error {
	v1 := tx.Bucket(bucketV1)
	if v1 == nil {
		return nil
	}
	if old := v1.Bucket(bucketSessions); old != nil {
		if err := old.ForEach(func(k, v []byte) error {
			if into.Get(k) != nil {
				return nil
			}
			return into.Put(k, v)
		}); err != nil {
			return fmt.Errorf("migrate v1 sessions: %w", err)
		}
	}
	if err := tx.DeleteBucket(bucketV1); err != nil {
		return fmt.Errorf("migrate v1: delete old layout: %w", err)
	}
	return nil
}

// Close closes the file.
func (s *Store) Close() error { return s.db.Close() }

func sessions(tx *bolt.Tx) *bolt.Bucket {
	return tx.Bucket(bucketV2).Bucket(bucketSessions)
}

func meta(tx *bolt.Tx) *bolt.Bucket {
	return tx.Bucket(bucketV2).Bucket(bucketMeta)
}

// batchDelay is how long a batch of session records waits for more.
const batchDelay = 500 * time.Microsecond

// PutSession records (or replaces) a session, durably, batched with the
// records other goroutines write at the same time.
func (s *Store) PutSession(rec Session) error {
	if rec.SessionID == "" {
		return errors.New("put session: empty session id")
	}
	if err := s.db.Batch(func(tx *bolt.Tx) error {
		return putSession(tx, rec)
	}); err != nil {
		return fmt.Errorf("put session %s: %w", rec.SessionID, err)
	}
	return nil
}

func putSession(tx *bolt.Tx, rec Session) error {
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	return sessions(tx).Put([]byte(rec.SessionID), b)
}

func getSession(tx *bolt.Tx, id string) (Session, error) {
	var rec Session
	v := sessions(tx).Get([]byte(id))
	if v == nil {
		return rec, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	if err := json.Unmarshal(v, &rec); err != nil {
		return rec, fmt.Errorf("decode session %s: %w", id, err)
	}
	return rec, nil
}

// DeleteSession forgets a session; forgetting an unknown one is not an error.
func (s *Store) DeleteSession(id string) error {
	if err := s.db.Update(func(tx *bolt.Tx) error {
		return sessions(tx).Delete([]byte(id))
	}); err != nil {
		return fmt.Errorf("delete session %s: %w", id, err)
	}
	return nil
}

// Sessions returns every recorded session, sorted by id.
func (s *Store) Sessions() ([]Session, error) {
	var out []Session
	err := s.db.View(func(tx *bolt.Tx) error {
		return sessions(tx).ForEach(func(k, v []byte) error {
			var rec Session
			if err := json.Unmarshal(v, &rec); err != nil {
				return fmt.Errorf("session %s: %w", k, err)
			}
			out = append(out, rec)
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("list sessions: %w", err)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].SessionID < out[j].SessionID })
	return out, nil
}

// AddPending records that an execution was handed to a session's executor.
// Adding a pending execution again changes nothing; an unknown session is
// ErrNotFound.
func (s *Store) AddPending(sessionID, executionID string) error {
	return s.updatePending(sessionID, executionID, "add", func(ids []string) []string {
		i, found := slices.BinarySearch(ids, executionID)
		if found {
			return ids
		}
		return slices.Insert(ids, i, executionID)
	})
}

// RemovePending records that an execution's result was relayed. Removing an
// execution (or from a session) the store does not hold is not an error.
func (s *Store) RemovePending(sessionID, executionID string) error {
	err := s.updatePending(sessionID, executionID, "remove", func(ids []string) []string {
		return slices.DeleteFunc(ids, func(id string) bool { return id == executionID })
	})
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	return err
}

func (s *Store) updatePending(sessionID, executionID, op string, edit func([]string) []string) error {
	err := s.db.Update(func(tx *bolt.Tx) error {
		rec, err := getSession(tx, sessionID)
		if err != nil {
			return err
		}
		before := len(rec.PendingExecutionIDs)
		rec.PendingExecutionIDs = edit(rec.PendingExecutionIDs)
		if len(rec.PendingExecutionIDs) == before {
			return nil // nothing changed: skip the write
		}
		if len(rec.PendingExecutionIDs) == 0 {
			rec.PendingExecutionIDs = nil
		}
		return putSession(tx, rec)
	})
	if err != nil {
		return fmt.Errorf("%s pending execution %s of session %s: %w", op, executionID, sessionID, err)
	}
	return nil
}

// FenceTerm returns the highest fence term recorded; 0 when none was.
func (s *Store) FenceTerm() (uint64, error) {
	var term uint64
	err := s.db.View(func(tx *bolt.Tx) error {
		var err error
		term, err = decodeTerm(meta(tx).Get(keyFenceTerm))
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("read fence term: %w", err)
	}
	return term, nil
}

// RaiseFenceTerm records term if it is higher than the recorded one and
// returns the highest term recorded afterwards.
func (s *Store) RaiseFenceTerm(term uint64) (uint64, error) {
	var highest uint64
	err := s.db.Update(func(tx *bolt.Tx) error {
		m := meta(tx)
		var err error
		if highest, err = decodeTerm(m.Get(keyFenceTerm)); err != nil {
			return err
		}
		if term <= highest {
			return nil
		}
		highest = term
		return m.Put(keyFenceTerm, binary.BigEndian.AppendUint64(nil, term))
	})
	if err != nil {
		return 0, fmt.Errorf("raise fence term to %d: %w", term, err)
	}
	return highest, nil
}

// decodeTerm reads a stored term; a missing one is 0, a malformed one an
// error (guessing 0 would let a deposed leader's commands through).
func decodeTerm(v []byte) (uint64, error) {
	switch len(v) {
	case 0:
		return 0, nil
	case 8:
		return binary.BigEndian.Uint64(v), nil
	}
	return 0, fmt.Errorf("malformed fence term: %d bytes", len(v))
}
