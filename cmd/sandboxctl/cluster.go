package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"connectrpc.com/connect"

	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

// restoreChunkSize is the size of the messages RestoreSnapshot streams.
const restoreChunkSize = 64 << 10

func (a *app) cmdClusterStatus(ctx context.Context, args []string) error {
	fs := a.newFlagSet("cluster status")
	format := outputFlag(fs)
	if _, err := a.parseLeaf(fs, args, "cluster status",
		"Shows the servers (the Raft members), which one leads, and the Raft term and indexes of the server that answered.", 0, 0); err != nil {
		return err
	}
	c, err := a.clients()
	if err != nil {
		return err
	}
	resp, err := c.cluster.GetClusterStatus(ctx, connect.NewRequest(&sandboxv1.GetClusterStatusRequest{}))
	if err != nil {
		return err
	}
	st := resp.Msg
	if *format == formatJSON {
		return a.printJSON(st)
	}
	t := newTable(a.stdout, "ID", "ADDRESS", "API", "ROLE", "VOTER")
	for _, s := range st.GetServers() {
		t.row(s.GetId(), s.GetAddress(), s.GetApiAddress(), serverRoleName(s.GetRole()), strconv.FormatBool(s.GetVoter()))
	}
	if err := t.flush(); err != nil {
		return err
	}
	leader := st.GetLeaderId()
	if leader == "" {
		leader = "none"
	}
	line := fmt.Sprintf("\nleader %s, term %d, commit index %d, applied index %d",
		leader, st.GetTerm(), st.GetCommitIndex(), st.GetAppliedIndex())
	if id := st.GetServerId(); id != "" {
		line += " (as seen by " + id + ")"
	}
	_, err = fmt.Fprintln(a.stdout, line)
	return err
}

// serverRoleName is a server's role without its enum prefix: LEADER,
// FOLLOWER, CANDIDATE, NONVOTER, UNKNOWN, as Raft names them.
func serverRoleName(r sandboxv1.ServerRole) string {
	return strings.TrimPrefix(r.String(), "SERVER_ROLE_")
}

// nodeStateName is a node state without its enum prefix, lower-case.
func nodeStateName(s sandboxv1.NodeState) string {
	return strings.ToLower(strings.TrimPrefix(s.String(), "NODE_STATE_"))
}

func (a *app) cmdClusterNodes(ctx context.Context, args []string) error {
	fs := a.newFlagSet("cluster nodes")
	format := outputFlag(fs)
	if _, err := a.parseLeaf(fs, args, "cluster nodes",
		"Lists the nodes (agents): their state, what their sessions hold of their capacity, and their warm pools.", 0, 0); err != nil {
		return err
	}
	c, err := a.clients()
	if err != nil {
		return err
	}
	resp, err := c.cluster.ListNodes(ctx, connect.NewRequest(&sandboxv1.ListNodesRequest{}))
	if err != nil {
		return err
	}
	if *format == formatJSON {
		return a.printJSON(resp.Msg)
	}
	t := newTable(a.stdout, "ID", "ADDRESS", "STATE", "CPU", "MEMORY", "SESSIONS", "WARM", "AGE")
	for _, n := range resp.Msg.GetNodes() {
		t.row(n.GetId(), n.GetAddress(), nodeStateName(n.GetState()),
			fmt.Sprintf("%dm/%dm", n.GetAllocated().GetCpuMillis(), n.GetCapacity().GetCpuMillis()),
			fmt.Sprintf("%d/%dMiB", n.GetAllocated().GetMemoryMib(), n.GetCapacity().GetMemoryMib()),
			strconv.Itoa(int(n.GetSessions())), formatWarmPools(n.GetWarmPools()), age(a.now(), n.GetStateChangedAt()))
	}
	return t.flush()
}

// formatWarmPools formats warm pools as template=ready pairs sorted by
// template: python-basic=3,nodejs-basic=1.
func formatWarmPools(pools []*sandboxv1.WarmPool) string {
	pools = slices.Clone(pools)
	slices.SortFunc(pools, func(x, y *sandboxv1.WarmPool) int { return strings.Compare(x.GetTemplateId(), y.GetTemplateId()) })
	parts := make([]string, 0, len(pools))
	for _, p := range pools {
		parts = append(parts, fmt.Sprintf("%s=%d", p.GetTemplateId(), p.GetReady()))
	}
	return strings.Join(parts, ",")
}

func (a *app) cmdClusterDrain(ctx context.Context, args []string) error {
	fs := a.newFlagSet("cluster drain")
	format := outputFlag(fs)
	pos, err := a.parseLeaf(fs, args, "cluster drain NODE_ID",
		"Stops placing new sessions on a node; the sessions it runs go on until they end. Prints the node's id and state.", 1, 1)
	if err != nil {
		return err
	}
	c, err := a.clients()
	if err != nil {
		return err
	}
	resp, err := c.cluster.DrainNode(ctx, connect.NewRequest(&sandboxv1.DrainNodeRequest{NodeId: pos[0]}))
	if err != nil {
		return fmt.Errorf("node %s: %w", pos[0], err)
	}
	n := resp.Msg.GetNode()
	if *format == formatJSON {
		return a.printJSON(n)
	}
	_, err = fmt.Fprintf(a.stdout, "%s %s\n", n.GetId(), nodeStateName(n.GetState()))
	return err
}

func (a *app) cmdClusterJoin(ctx context.Context, args []string) error {
	fs := a.newFlagSet("cluster join")
	format := outputFlag(fs)
	pos, err := a.parseLeaf(fs, args, "cluster join ADDRESS",
		"Adds a server to the cluster as a voter. ADDRESS is the host:port of the new server's internal port; it must be running, started to join. Prints its id.", 1, 1)
	if err != nil {
		return err
	}
	if _, _, err := net.SplitHostPort(pos[0]); err != nil {
		return usagef("cluster join: ADDRESS must be the new server's internal host:port: %v", err)
	}
	c, err := a.clients()
	if err != nil {
		return err
	}
	resp, err := c.cluster.JoinServer(ctx, connect.NewRequest(&sandboxv1.JoinServerRequest{Address: pos[0]}))
	if err != nil {
		return fmt.Errorf("join %s: %w", pos[0], err)
	}
	s := resp.Msg.GetServer()
	if *format == formatJSON {
		return a.printJSON(s)
	}
	_, err = fmt.Fprintln(a.stdout, s.GetId())
	return err
}

func (a *app) cmdClusterRemove(ctx context.Context, args []string) error {
	fs := a.newFlagSet("cluster remove")
	pos, err := a.parseLeaf(fs, args, "cluster remove SERVER_ID",
		"Removes a server from the Raft configuration and prints its id. Removing a voter lowers the quorum; removing the leader makes the others elect a new one.", 1, 1)
	if err != nil {
		return err
	}
	c, err := a.clients()
	if err != nil {
		return err
	}
	if _, err := c.cluster.RemoveServer(ctx, connect.NewRequest(&sandboxv1.RemoveServerRequest{ServerId: pos[0]})); err != nil {
		return fmt.Errorf("server %s: %w", pos[0], err)
	}
	_, err = fmt.Fprintln(a.stdout, pos[0])
	return err
}

func (a *app) cmdSnapshotSave(ctx context.Context, args []string) error {
	fs := a.newFlagSet("cluster snapshot save")
	pos, err := a.parseLeaf(fs, args, "cluster snapshot save FILE|-", `
Saves a snapshot of the replicated state (templates, sessions, executions,
nodes, servers) to FILE, for backups: it is streamed to a temporary file
beside FILE (mode 0600: the state holds session environments) and renamed to
FILE only once complete. "-" writes to stdout. The number of bytes written
goes to stderr.`, 1, 1)
	if err != nil {
		return err
	}
	c, err := a.clients()
	if err != nil {
		return err
	}
	var n int64
	if pos[0] == "-" {
		n, err = saveSnapshot(ctx, c, a.stdout)
		if err != nil {
			return err
		}
		fmt.Fprintf(a.stderr, "sandboxctl: wrote %d bytes of snapshot to stdout\n", n)
		return nil
	}
	dest, err := a.abs(pos[0])
	if err != nil {
		return err
	}
	if n, err = saveSnapshotFile(ctx, c, dest); err != nil {
		return err
	}
	fmt.Fprintf(a.stderr, "sandboxctl: wrote %d bytes of snapshot to %s\n", n, pos[0])
	return nil
}

// saveSnapshotFile streams a snapshot into a temporary file beside dest,
// syncs it, and renames it to dest; on any failure it leaves nothing.
func saveSnapshotFile(ctx context.Context, c *clients, dest string) (int64, error) {
	tmp, err := os.CreateTemp(filepath.Dir(dest), "."+filepath.Base(dest)+".*.tmp")
	if err != nil {
		return 0, fmt.Errorf("save snapshot: %w", err)
	}
	n, err := saveSnapshot(ctx, c, tmp)
	if err == nil {
		if err = tmp.Sync(); err != nil {
			err = fmt.Errorf("save snapshot: %w", err)
		}
	}
	if cerr := tmp.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("save snapshot: %w", cerr)
	}
	if err == nil {
		if err = os.Rename(tmp.Name(), dest); err != nil {
			err = fmt.Errorf("save snapshot: %w", err)
		}
	}
	if err != nil {
		os.Remove(tmp.Name())
		return 0, err
	}
	return n, nil
}

// saveSnapshot streams a snapshot into w and returns its size. An empty
// snapshot is an error: even an empty state has a header, and a backup of
// nothing must not pass for one.
func saveSnapshot(ctx context.Context, c *clients, w io.Writer) (int64, error) {
	stream, err := c.cluster.SaveSnapshot(ctx, connect.NewRequest(&sandboxv1.SaveSnapshotRequest{}))
	if err != nil {
		return 0, fmt.Errorf("save snapshot: %w", err)
	}
	defer stream.Close()
	var n int64
	for stream.Receive() {
		m, err := w.Write(stream.Msg().GetChunk())
		n += int64(m)
		if err != nil {
			return n, fmt.Errorf("save snapshot: %w", err)
		}
	}
	if err := stream.Err(); err != nil {
		return n, fmt.Errorf("save snapshot: %w", err)
	}
	if n == 0 {
		return 0, connect.NewError(connect.CodeInternal, errors.New("save snapshot: the server sent an empty snapshot"))
	}
	return n, nil
}

func (a *app) cmdSnapshotRestore(ctx context.Context, args []string) error {
	fs := a.newFlagSet("cluster snapshot restore")
	yes := fs.Bool("yes", false, "do not ask for confirmation")
	pos, err := a.parseLeaf(fs, args, "cluster snapshot restore FILE|- [--yes]", `
Replaces the cluster's whole replicated state (templates, sessions,
executions, nodes, servers) with a snapshot that 'cluster snapshot save'
wrote. What happened since the snapshot is lost. Asks for confirmation on the
terminal unless --yes is given; "-" reads the snapshot from stdin and needs
--yes.`, 1, 1)
	if err != nil {
		return err
	}
	name := pos[0]
	var src io.Reader
	if name == "-" {
		if !*yes {
			return usagef("cluster snapshot restore: reading the snapshot from stdin needs --yes")
		}
		src, name = a.stdin, "stdin"
	} else {
		path, err := a.abs(name)
		if err != nil {
			return err
		}
		f, err := os.Open(path)
		if err != nil {
			return fmt.Errorf("restore snapshot: %w", err)
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			return fmt.Errorf("restore snapshot: %w", err)
		}
		switch {
		case !fi.Mode().IsRegular():
			return fmt.Errorf("restore snapshot: %s is not a regular file", name)
		case fi.Size() == 0:
			return fmt.Errorf("restore snapshot: %s is empty", name)
		}
		if !*yes {
			if err := a.confirm(fmt.Sprintf("This replaces the whole state of the cluster at %s with the snapshot in %s (%s); everything since that snapshot is lost.",
				a.addrForPrompt(), name, formatBytes(fi.Size()))); err != nil {
				return err
			}
		}
		src = f
	}
	c, err := a.clients()
	if err != nil {
		return err
	}
	n, err := restoreSnapshot(ctx, c, src)
	if err != nil {
		return err
	}
	fmt.Fprintf(a.stderr, "sandboxctl: restored the cluster's state from %s (%d bytes)\n", name, n)
	return nil
}

// addrForPrompt is the API address the command talks to, for people.
func (a *app) addrForPrompt() string {
	cfg, err := a.config()
	if err != nil {
		return "?"
	}
	return cfg.addr
}

// confirm asks on stderr for "yes" typed on the terminal, and fails unless
// it was typed. Without a terminal it fails at once: scripts say --yes.
func (a *app) confirm(what string) error {
	if !a.stdinIsTerminal() {
		return usagef("%s\nstdin is not a terminal to confirm on: run with --yes", what)
	}
	fmt.Fprintf(a.stderr, "%s\nType yes to continue: ", what)
	line, err := bufio.NewReader(a.stdin).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("read confirmation: %w", err)
	}
	if strings.TrimSpace(line) != "yes" {
		fmt.Fprintln(a.stderr, "sandboxctl: aborted, nothing was changed")
		return &exitCodeError{code: exitError}
	}
	return nil
}

// restoreSnapshot streams src to RestoreSnapshot in restoreChunkSize
// messages and returns the number of bytes sent. When src fails, the call
// is canceled rather than closed, so that the server never mistakes a
// truncated snapshot for a whole one.
func restoreSnapshot(ctx context.Context, c *clients, src io.Reader) (int64, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream := c.cluster.RestoreSnapshot(ctx)
	abort := func(err error) (int64, error) {
		cancel()
		_, _ = stream.CloseAndReceive()
		return 0, err
	}
	buf := make([]byte, restoreChunkSize)
	var n int64
	for {
		m, rerr := io.ReadFull(src, buf)
		if m > 0 {
			err := stream.Send(&sandboxv1.RestoreSnapshotRequest{Chunk: buf[:m]})
			if errors.Is(err, io.EOF) {
				// The server ended the call early; its reason comes with
				// the response.
				break
			}
			if err != nil {
				return abort(fmt.Errorf("restore snapshot: %w", err))
			}
			n += int64(m)
		}
		if errors.Is(rerr, io.EOF) || errors.Is(rerr, io.ErrUnexpectedEOF) {
			if n == 0 {
				return abort(errors.New("restore snapshot: the snapshot is empty"))
			}
			break
		}
		if rerr != nil {
			return abort(fmt.Errorf("restore snapshot: read: %w", rerr))
		}
	}
	if _, err := stream.CloseAndReceive(); err != nil {
		return n, fmt.Errorf("restore snapshot: %w", err)
	}
	return n, nil
}
