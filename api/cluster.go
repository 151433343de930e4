package api

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"

	"connectrpc.com/connect"

	"github.com/sandboxhq/sandbox"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

// MaxSnapshotBytes bounds a snapshot a client may restore.
const MaxSnapshotBytes = 1 << 30

// ClusterBackend is what ClusterService needs from the scheduler.
type ClusterBackend interface {
	ClusterStatus(ctx context.Context) (*sandboxv1.GetClusterStatusResponse, error)
	ListNodes(ctx context.Context) ([]*sandboxv1.Node, error)
	DrainNode(ctx context.Context, id string) (*sandboxv1.Node, error)
	JoinServer(ctx context.Context, address string) (*sandboxv1.Server, error)
	RemoveServer(ctx context.Context, id string) error
	SaveSnapshot(ctx context.Context, send func([]byte) error) error
	RestoreSnapshot(ctx context.Context, data []byte) error
}

type clusterHandlers struct {
	b      ClusterBackend
	logger *slog.Logger
}

func (h *clusterHandlers) fail(ctx context.Context, err error) error {
	return (&handlers{logger: h.logger}).fail(ctx, err)
}

func (h *clusterHandlers) GetClusterStatus(ctx context.Context, _ *connect.Request[sandboxv1.GetClusterStatusRequest]) (*connect.Response[sandboxv1.GetClusterStatusResponse], error) {
	st, err := h.b.ClusterStatus(ctx)
	if err != nil {
		return nil, h.fail(ctx, err)
	}
	return connect.NewResponse(st), nil
}

func (h *clusterHandlers) ListNodes(ctx context.Context, _ *connect.Request[sandboxv1.ListNodesRequest]) (*connect.Response[sandboxv1.ListNodesResponse], error) {
	nodes, err := h.b.ListNodes(ctx)
	if err != nil {
		return nil, h.fail(ctx, err)
	}
	return connect.NewResponse(&sandboxv1.ListNodesResponse{Nodes: nodes}), nil
}

func (h *clusterHandlers) DrainNode(ctx context.Context, req *connect.Request[sandboxv1.DrainNodeRequest]) (*connect.Response[sandboxv1.DrainNodeResponse], error) {
	n, err := h.b.DrainNode(ctx, req.Msg.GetNodeId())
	if err != nil {
		return nil, h.fail(ctx, err)
	}
	return connect.NewResponse(&sandboxv1.DrainNodeResponse{Node: n}), nil
}

func (h *clusterHandlers) JoinServer(ctx context.Context, req *connect.Request[sandboxv1.JoinServerRequest]) (*connect.Response[sandboxv1.JoinServerResponse], error) {
	srv, err := h.b.JoinServer(ctx, req.Msg.GetAddress())
	if err != nil {
		return nil, h.fail(ctx, err)
	}
	return connect.NewResponse(&sandboxv1.JoinServerResponse{Server: srv}), nil
}

func (h *clusterHandlers) RemoveServer(ctx context.Context, req *connect.Request[sandboxv1.RemoveServerRequest]) (*connect.Response[sandboxv1.RemoveServerResponse], error) {
	if err := h.b.RemoveServer(ctx, req.Msg.GetServerId()); err != nil {
		return nil, h.fail(ctx, err)
	}
	return connect.NewResponse(&sandboxv1.RemoveServerResponse{}), nil
}

func (h *clusterHandlers) SaveSnapshot(ctx context.Context, _ *connect.Request[sandboxv1.SaveSnapshotRequest], stream *connect.ServerStream[sandboxv1.SaveSnapshotResponse]) error {
	err := h.b.SaveSnapshot(ctx, func(chunk []byte) error {
		return stream.Send(&sandboxv1.SaveSnapshotResponse{Chunk: chunk})
	})
	if err != nil {
		return h.fail(ctx, err)
	}
	return nil
}

func (h *clusterHandlers) RestoreSnapshot(ctx context.Context, stream *connect.ClientStream[sandboxv1.RestoreSnapshotRequest]) (*connect.Response[sandboxv1.RestoreSnapshotResponse], error) {
	var buf bytes.Buffer
	for stream.Receive() {
		buf.Write(stream.Msg().GetChunk())
		if buf.Len() > MaxSnapshotBytes {
			return nil, h.fail(ctx, fmt.Errorf("%w: snapshot larger than %d bytes", sandbox.ErrInvalidArgument, MaxSnapshotBytes))
		}
	}
	if err := stream.Err(); err != nil {
		return nil, err
	}
	if err := h.b.RestoreSnapshot(ctx, buf.Bytes()); err != nil {
		return nil, h.fail(ctx, err)
	}
	return connect.NewResponse(&sandboxv1.RestoreSnapshotResponse{}), nil
}
