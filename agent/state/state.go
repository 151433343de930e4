// Package state is the agent's own small durable store: which container
// serves which session, so that a restarted agent can find (and, from the
// re-adoption work on, re-adopt) what it started.
//
// It is one bbolt file, <DataDir>/agent.db, with this bucket layout:
//
//	v1                              schema version 1; a new layout gets a new top-level bucket
//	├── meta
//	│   └── "schema" -> "1"
//	└── sessions
//	    └── <session id> -> JSON Session {session_id, container_id, template_id, image, token, created_at}
//
// The file holds the sessions' callback tokens, so it is created mode 0600.
package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	bolt "go.etcd.io/bbolt"
)

var (
	bucketV1       = []byte("v1")
	bucketMeta     = []byte("meta")
	bucketSessions = []byte("sessions")
	keySchema      = []byte("schema")
)

const schemaVersion = "1"

// Session is what the agent records for one session's container.
type Session struct {
	SessionID   string    `json:"session_id"`
	ContainerID string    `json:"container_id"`
	TemplateID  string    `json:"template_id"`
	Image       string    `json:"image"`
	Token       string    `json:"token"`
	CreatedAt   time.Time `json:"created_at"`
}

// Store is the agent's bbolt store.
type Store struct {
	db *bolt.DB
}

// Open opens (creating if needed) the store at path.
func Open(path string) (*Store, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("open agent state %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		v1, err := tx.CreateBucketIfNotExists(bucketV1)
		if err != nil {
			return err
		}
		meta, err := v1.CreateBucketIfNotExists(bucketMeta)
		if err != nil {
			return err
		}
		if v := meta.Get(keySchema); v != nil && string(v) != schemaVersion {
			return fmt.Errorf("unknown schema %q", v)
		}
		if err := meta.Put(keySchema, []byte(schemaVersion)); err != nil {
			return err
		}
		_, err = v1.CreateBucketIfNotExists(bucketSessions)
		return err
	})
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("open agent state %s: %w", path, err)
	}
	return &Store{db: db}, nil
}

// Close closes the file.
func (s *Store) Close() error { return s.db.Close() }

func sessions(tx *bolt.Tx) *bolt.Bucket {
	return tx.Bucket(bucketV1).Bucket(bucketSessions)
}

// PutSession records (or replaces) a session.
func (s *Store) PutSession(rec Session) error {
	if rec.SessionID == "" {
		return errors.New("put session: empty session id")
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("put session %s: %w", rec.SessionID, err)
	}
	if err := s.db.Update(func(tx *bolt.Tx) error {
		return sessions(tx).Put([]byte(rec.SessionID), b)
	}); err != nil {
		return fmt.Errorf("put session %s: %w", rec.SessionID, err)
	}
	return nil
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
