package raftnode

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/hashicorp/raft"
)

// HadState reports whether the node found Raft state on disk when it
// started; a node without it has never been part of a cluster.
func (n *Node) HadState() bool { return n.hadState }

// Term is the node's current Raft term.
func (n *Node) Term() uint64 { return n.raft.CurrentTerm() }

// AppliedIndex is the index of the last command applied to the FSM here.
func (n *Node) AppliedIndex() uint64 { return n.raft.AppliedIndex() }

// CommitIndex is the highest index this node knows to be committed.
func (n *Node) CommitIndex() uint64 { return n.raft.CommitIndex() }

func timeoutOf(ctx context.Context) time.Duration {
	if dl, ok := ctx.Deadline(); ok {
		return time.Until(dl)
	}
	return DefaultApplyTimeout
}

// BootstrapServers forms a new cluster of the given voters (id -> Raft
// address). Every server of a new cluster may call it with the same set;
// it is refused once the node has state.
func (n *Node) BootstrapServers(voters map[string]string) error {
	var conf raft.Configuration
	for id, addr := range voters {
		conf.Servers = append(conf.Servers, raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(id), Address: raft.ServerAddress(addr)})
	}
	if err := n.raft.BootstrapCluster(conf).Error(); err != nil {
		return n.wrap("bootstrap", err)
	}
	n.hadState = true
	n.logger.Info("bootstrapped raft cluster", "voters", len(voters))
	return nil
}

// RemoveServer removes a server from the configuration. It must run on the leader.
func (n *Node) RemoveServer(ctx context.Context, id string) error {
	if err := n.raft.RemoveServer(raft.ServerID(id), 0, timeoutOf(ctx)).Error(); err != nil {
		return n.wrap(fmt.Sprintf("remove server %q", id), err)
	}
	return nil
}

// VerifyLeader confirms, with a round of heartbeats, that this node still
// leads; a read served after it is linearizable.
func (n *Node) VerifyLeader(ctx context.Context) error {
	f := n.raft.VerifyLeader()
	done := make(chan error, 1)
	go func() { done <- f.Error() }()
	select {
	case err := <-done:
		if err != nil {
			return n.wrap("verify leadership", err)
		}
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Servers returns the current Raft configuration.
func (n *Node) Servers() ([]raft.Server, error) {
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, n.wrap("read configuration", err)
	}
	return f.Configuration().Servers, nil
}

// Snapshot takes a snapshot now and opens it: the bytes are the FSM's
// snapshot encoding. The caller closes the reader.
func (n *Node) Snapshot() (io.ReadCloser, error) {
	f := n.raft.Snapshot()
	if err := f.Error(); err != nil {
		return nil, n.wrap("snapshot", err)
	}
	_, rc, err := f.Open()
	if err != nil {
		return nil, n.wrap("open snapshot", err)
	}
	return rc, nil
}

// Restore replaces the cluster's state with a snapshot taken by Snapshot,
// size bytes long.
// It must run on the leader; followers catch up from it.
func (n *Node) Restore(ctx context.Context, r io.Reader, size int64) error {
	meta := &raft.SnapshotMeta{Version: raft.SnapshotVersionMax, Size: size}
	if err := n.raft.Restore(meta, r, timeoutOf(ctx)); err != nil {
		return n.wrap("restore snapshot", err)
	}
	return nil
}

// Barrier waits until every entry committed before it is applied to the
// FSM here. A new leader runs one before serving reads, since being leader
// does not yet mean having applied what earlier leaders committed.
func (n *Node) Barrier(ctx context.Context) error {
	if err := n.raft.Barrier(timeoutOf(ctx)).Error(); err != nil {
		return n.wrap("barrier", err)
	}
	return nil
}
