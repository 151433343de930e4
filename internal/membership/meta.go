package membership

import (
	"crypto/sha256"
	"errors"
	"fmt"

	"github.com/hashicorp/memberlist"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
)

// ErrMetaTooLarge is returned (wrapped) when a node's encoded meta exceeds
// memberlist.MetaMaxSize. Meta is never truncated: a truncated protobuf would
// decode into wrong values on every other member.
var ErrMetaTooLarge = errors.New("node meta too large")

// EncodeMeta encodes meta as memberlist node metadata. The encoding is
// deterministic (map entries such as Warm are sorted), so an unchanged meta
// encodes to the same bytes and memberlist does not report a spurious update.
// A nil meta encodes to no bytes.
func EncodeMeta(meta *agentv1.NodeMeta) ([]byte, error) {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(meta)
	if err != nil {
		return nil, fmt.Errorf("membership: encode node meta for %q: %w", meta.GetId(), err)
	}
	if len(b) > memberlist.MetaMaxSize {
		return nil, fmt.Errorf("membership: node meta for %q is %d bytes encoded, memberlist allows at most %d: %w",
			meta.GetId(), len(b), memberlist.MetaMaxSize, ErrMetaTooLarge)
	}
	return b, nil
}

// DecodeMeta decodes node metadata written by EncodeMeta.
func DecodeMeta(b []byte) (*agentv1.NodeMeta, error) {
	meta := &agentv1.NodeMeta{}
	if err := proto.Unmarshal(b, meta); err != nil {
		return nil, fmt.Errorf("membership: decode node meta (%d bytes): %w", len(b), err)
	}
	return meta, nil
}

// KeyFromToken derives the gossip encryption key (AES-256) from the cluster
// token, so that members need nothing but the token they already share.
func KeyFromToken(token string) []byte {
	sum := sha256.Sum256([]byte("sandbox gossip key\x00" + token))
	return sum[:]
}
