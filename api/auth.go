package api

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"

	"connectrpc.com/connect"
)

// Keys holds the API keys the server accepts. A key file has one key per
// line, optionally preceded by a name and whitespace ("ci 3f9a..."); blank
// lines and lines starting with # are ignored.
type Keys struct {
	// sums are SHA-256 digests of the keys, so that comparing does not leak a
	// key's length or prefix through timing.
	sums  [][sha256.Size]byte
	names []string
}

// LoadKeys reads a key file.
func LoadKeys(path string) (*Keys, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("api keys: %w", err)
	}
	defer f.Close()
	k := &Keys{}
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fields := strings.Fields(line)
		name, key := "default", fields[0]
		switch len(fields) {
		case 1:
		case 2:
			name, key = fields[0], fields[1]
		default:
			return nil, fmt.Errorf("api keys: %s line %d: want KEY or NAME KEY", path, n)
		}
		if len(key) < 16 {
			return nil, fmt.Errorf("api keys: %s line %d: key shorter than 16 characters", path, n)
		}
		k.Add(name, key)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("api keys: %s: %w", path, err)
	}
	if len(k.sums) == 0 {
		return nil, fmt.Errorf("api keys: %s holds no key", path)
	}
	return k, nil
}

// Add accepts one more key under a name.
func (k *Keys) Add(name, key string) {
	k.sums = append(k.sums, sha256.Sum256([]byte(key)))
	k.names = append(k.names, name)
}

// lookup returns the name of key, comparing against every key in constant time.
func (k *Keys) lookup(key string) (string, bool) {
	sum := sha256.Sum256([]byte(key))
	found := -1
	for i := range k.sums {
		if subtle.ConstantTimeCompare(sum[:], k.sums[i][:]) == 1 {
			found = i
		}
	}
	if found < 0 {
		return "", false
	}
	return k.names[found], true
}

type principalKey struct{}

// Principal is the name of the key that authenticated the call.
func Principal(ctx context.Context) string {
	p, _ := ctx.Value(principalKey{}).(string)
	return p
}

// BearerToken extracts the token of an "Authorization: Bearer" header.
func BearerToken(h http.Header) (string, bool) {
	v := h.Get("Authorization")
	const prefix = "Bearer "
	if len(v) <= len(prefix) || !strings.EqualFold(v[:len(prefix)], prefix) {
		return "", false
	}
	return strings.TrimSpace(v[len(prefix):]), true
}

// NewAuthInterceptor refuses calls without a known bearer key.
func NewAuthInterceptor(keys *Keys) connect.Interceptor {
	return &authInterceptor{keys: keys}
}

type authInterceptor struct{ keys *Keys }

func (a *authInterceptor) check(ctx context.Context, h http.Header) (context.Context, error) {
	tok, ok := BearerToken(h)
	if !ok {
		return ctx, connect.NewError(connect.CodeUnauthenticated, errors.New("missing API key: send the header \"Authorization: Bearer <key>\""))
	}
	name, ok := a.keys.lookup(tok)
	if !ok {
		return ctx, connect.NewError(connect.CodeUnauthenticated, errors.New("invalid API key"))
	}
	return context.WithValue(ctx, principalKey{}, name), nil
}

func (a *authInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		ctx, err := a.check(ctx, req.Header())
		if err != nil {
			return nil, err
		}
		return next(ctx, req)
	}
}

func (a *authInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (a *authInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		ctx, err := a.check(ctx, conn.RequestHeader())
		if err != nil {
			return err
		}
		return next(ctx, conn)
	}
}
