package scheduler

import (
	"context"
	"errors"
	"net/http"
	"net/http/httputil"
	"net/url"
	"path"
	"strings"

	"connectrpc.com/connect"

	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	"github.com/sandboxhq/sandbox/internal/membership"
)

// Headers of the forwarding protocol between servers and clients.
const (
	// ReadConsistencyHeader set to "stale" lets a read be answered from the
	// receiving server's local state instead of through the leader.
	ReadConsistencyHeader = "Sandbox-Read-Consistency"
	// forwardedHeader marks a request one server forwarded to another, so a
	// request is forwarded at most once.
	forwardedHeader = "Sandbox-Forwarded-By"
)

// Port says which of a leader's ports a forwarded request goes to.
type Port int

// The two ports a server forwards.
const (
	PublicPort Port = iota
	InternalPort
)

// localMethods are always answered by the receiving server.
var localMethods = map[string]bool{
	"GetServerInfo": true,
}

func isRead(method string) bool {
	return strings.HasPrefix(method, "Get") || strings.HasPrefix(method, "List") || method == "DownloadArtifact"
}

// Forward wraps a port's handler so that any server answers any call: the
// leader serves writes and linearizable reads (after confirming it still
// leads), a follower passes them to the leader unchanged (Connect, gRPC and
// gRPC-Web alike, streams included), and a read marked stale is answered
// locally. Paths outside the RPC services (/metrics, health, reflection)
// are always local.
func (s *Scheduler) Forward(next http.Handler, port Port) http.Handler {
	ew := connect.NewErrorWriter()
	fail := func(w http.ResponseWriter, r *http.Request, err error) {
		if ew.IsSupported(r) {
			_ = ew.Write(w, r, err)
			return
		}
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		method := path.Base(r.URL.Path)
		if !strings.HasPrefix(r.URL.Path, "/sandbox.") || localMethods[method] {
			next.ServeHTTP(w, r)
			return
		}
		read := isRead(method)
		if read && r.Header.Get(ReadConsistencyHeader) == "stale" {
			next.ServeHTTP(w, r)
			return
		}
		if s.raft.IsLeader() {
			// Every call, not only reads, checks the state first (a result
			// report looks its execution up): a new leader serves nothing
			// until it has applied what earlier leaders committed.
			if err := s.leaderBarrier(r.Context()); err != nil {
				fail(w, r, connect.NewError(connect.CodeUnavailable, errors.New("this server has just become the leader and is still applying the log; retry")))
				return
			}
			if read {
				if err := s.raft.VerifyLeader(r.Context()); err != nil {
					fail(w, r, connect.NewError(connect.CodeUnavailable, errors.New("this server lost the leadership while serving a read; retry")))
					return
				}
			}
			next.ServeHTTP(w, r)
			return
		}
		if by := r.Header.Get(forwardedHeader); by != "" {
			fail(w, r, connect.NewError(connect.CodeUnavailable, errors.New("request forwarded by "+by+" to a server that is not the leader; retry")))
			return
		}
		target := s.leaderAddress(port)
		if target == "" {
			fail(w, r, connect.NewError(connect.CodeUnavailable, s.noLeaderError()))
			return
		}
		r.Header.Set(forwardedHeader, s.cfg.Self.GetId())
		s.proxy(target, port, fail).ServeHTTP(w, r)
	})
}

// leaderAddress is the leader's address on a port, from its server record.
func (s *Scheduler) leaderAddress(port Port) string {
	_, id := s.raft.Leader()
	if id == "" {
		return ""
	}
	if srv, ok := s.fsm.Server(id); ok {
		if port == InternalPort {
			return srv.GetInternalAddress()
		}
		return srv.GetApiAddress()
	}
	// A leader elected moments ago may not have recorded its addresses in
	// the replicated state yet; every server also advertises them over gossip.
	if s.cfg.Mesh != nil {
		for _, m := range s.cfg.Mesh.Members() {
			if m.Meta.GetRole() == agentv1.NodeMeta_ROLE_SERVER && m.Meta.GetId() == id && m.State == membership.StateAlive {
				if port == InternalPort {
					return m.Meta.GetAddress()
				}
				return m.Meta.GetApiAddress()
			}
		}
	}
	return ""
}

// proxy returns the reverse proxy to one leader address (cleartext HTTP/2,
// so gRPC's trailers and streams pass through).
func (s *Scheduler) proxy(target string, port Port, fail func(http.ResponseWriter, *http.Request, error)) *httputil.ReverseProxy {
	s.proxiesMu.Lock()
	defer s.proxiesMu.Unlock()
	tlsConfig := s.cfg.PublicTLS
	if port != PublicPort {
		tlsConfig = nil
	}
	key := target
	if tlsConfig != nil {
		key = "https://" + target
	}
	if p, ok := s.proxies[key]; ok {
		return p
	}
	u := &url.URL{Scheme: "http", Host: target}
	t := &http.Transport{ForceAttemptHTTP2: true, MaxIdleConnsPerHost: 64}
	t.Protocols = new(http.Protocols)
	if tlsConfig != nil {
		u.Scheme = "https"
		t.TLSClientConfig = tlsConfig.Clone()
		t.Protocols.SetHTTP2(true)
	} else {
		t.Protocols.SetUnencryptedHTTP2(true)
	}
	p := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(u)
			pr.Out.Host = pr.In.Host
		},
		Transport:     t,
		FlushInterval: -1,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			fail(w, r, connect.NewError(connect.CodeUnavailable, errors.New("the leader at "+target+" did not answer; retry: "+err.Error())))
		},
	}
	s.proxies[key] = p
	return p
}

// noLeaderError says why a follower cannot forward.
func (s *Scheduler) noLeaderError() error {
	if _, id := s.raft.Leader(); id != "" {
		return errors.New("the leader " + id + " is known but its address is not yet; retry")
	}
	return errors.New("no leader is elected right now; retry (or read with " + ReadConsistencyHeader + ": stale)")
}

// leaderBarrier makes sure that, in this term, the leader has applied every
// entry earlier leaders committed before it serves a call from its FSM.
func (s *Scheduler) leaderBarrier(ctx context.Context) error {
	term := s.raft.Term()
	if s.readyTerm.Load() == term {
		return nil
	}
	if err := s.raft.Barrier(ctx); err != nil {
		return err
	}
	s.readyTerm.Store(term)
	return nil
}
