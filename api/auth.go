package api

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/sandboxhq/sandbox/api/gen/sandbox/v1/sandboxv1connect"
)

// Keys holds the API keys the server accepts, each belonging to a tenant.
//
// A key file has one key per line: "TENANT KEY [OPTION...]" (a line of a
// bare KEY belongs to tenant "default"); blank lines and lines starting
// with # are ignored. KEY is the key itself (at least 16 characters) or
// "sha256:" and the lower-case hex SHA-256 of it, so that the file need not
// hold secrets. Options:
//
//	admin          the key may also manage templates and the cluster, and
//	               sees every tenant's sessions and executions
//	rate=R         this key may make at most R calls a second (bursts of R)
//	sessions=N     the tenant may hold at most N live sessions
//	executions=R   the tenant may start at most R executions a second
//
// A tenant's quotas may be given on any of its lines, and must agree.
type Keys struct {
	// entries hold SHA-256 digests of the keys, so that comparing does not
	// leak a key's length or prefix through timing.
	entries []*keyEntry
	tenants map[string]*Tenant
}

type keyEntry struct {
	sum    [sha256.Size]byte
	tenant string
	admin  bool
	limit  *bucket // nil: no rate limit
	rate   float64
}

// Tenant is one tenant's quotas; zero means no limit.
type Tenant struct {
	Name string
	// MaxSessions bounds the tenant's live sessions.
	MaxSessions int
	// ExecutionsPerSecond bounds how fast the tenant starts executions.
	ExecutionsPerSecond float64
	executions          *bucket
}

// AllowExecution takes one execution from the tenant's rate, reporting
// false when it is spent.
func (t *Tenant) AllowExecution() bool {
	return t == nil || t.executions == nil || t.executions.allow(time.Now())
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
		if err := k.addLine(line); err != nil {
			return nil, fmt.Errorf("api keys: %s line %d: %w", path, n, err)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("api keys: %s: %w", path, err)
	}
	if len(k.entries) == 0 {
		return nil, fmt.Errorf("api keys: %s holds no key", path)
	}
	return k, nil
}

// addLine parses one line of a key file.
func (k *Keys) addLine(line string) error {
	fields := strings.Fields(line)
	tenant, key, opts := "default", fields[0], []string(nil)
	if len(fields) > 1 {
		tenant, key, opts = fields[0], fields[1], fields[2:]
	}
	if err := validTenant(tenant); err != nil {
		return err
	}
	e := &keyEntry{tenant: tenant}
	if hexSum, ok := strings.CutPrefix(key, "sha256:"); ok {
		b, err := hex.DecodeString(hexSum)
		if err != nil || len(b) != sha256.Size || strings.ToLower(hexSum) != hexSum {
			return fmt.Errorf("%q is not sha256: and 64 lower-case hex digits", key)
		}
		copy(e.sum[:], b)
	} else {
		if len(key) < 16 {
			return errors.New("key shorter than 16 characters (or give sha256:HEX of it)")
		}
		e.sum = sha256.Sum256([]byte(key))
	}
	q := Tenant{Name: tenant}
	for _, o := range opts {
		name, val, hasVal := strings.Cut(o, "=")
		switch {
		case name == "admin" && !hasVal:
			e.admin = true
		case name == "rate" && hasVal:
			r, err := strconv.ParseFloat(val, 64)
			if err != nil || r <= 0 {
				return fmt.Errorf("rate=%s: want a positive number of calls a second", val)
			}
			e.rate, e.limit = r, newBucket(r)
		case name == "sessions" && hasVal:
			n, err := strconv.Atoi(val)
			if err != nil || n <= 0 {
				return fmt.Errorf("sessions=%s: want a positive number of live sessions", val)
			}
			q.MaxSessions = n
		case name == "executions" && hasVal:
			r, err := strconv.ParseFloat(val, 64)
			if err != nil || r <= 0 {
				return fmt.Errorf("executions=%s: want a positive number of executions a second", val)
			}
			q.ExecutionsPerSecond = r
		default:
			return fmt.Errorf("unknown option %q: want admin, rate=R, sessions=N or executions=R", o)
		}
	}
	for _, other := range k.entries {
		if other.sum == e.sum {
			return fmt.Errorf("the key is listed twice (also for tenant %s)", other.tenant)
		}
	}
	if k.tenants == nil {
		k.tenants = map[string]*Tenant{}
	}
	if cur, ok := k.tenants[tenant]; ok {
		if (q.MaxSessions != 0 || q.ExecutionsPerSecond != 0) &&
			(cur.MaxSessions != 0 || cur.ExecutionsPerSecond != 0) &&
			(cur.MaxSessions != q.MaxSessions || cur.ExecutionsPerSecond != q.ExecutionsPerSecond) {
			return fmt.Errorf("tenant %s's quotas differ from an earlier line's", tenant)
		}
		if q.MaxSessions != 0 || q.ExecutionsPerSecond != 0 {
			cur.MaxSessions, cur.ExecutionsPerSecond = q.MaxSessions, q.ExecutionsPerSecond
		}
	} else {
		k.tenants[tenant] = &q
	}
	if t := k.tenants[tenant]; t.ExecutionsPerSecond > 0 && t.executions == nil {
		t.executions = newBucket(t.ExecutionsPerSecond)
	}
	k.entries = append(k.entries, e)
	return nil
}

// validTenant checks a tenant name: 1-64 of [A-Za-z0-9_.-].
func validTenant(t string) error {
	if t == "" || len(t) > 64 {
		return fmt.Errorf("tenant %q must be 1-64 characters", t)
	}
	for _, c := range t {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return fmt.Errorf("tenant %q may only hold letters, digits, '-', '_' and '.'", t)
		}
	}
	return nil
}

// AddAdmin accepts one more admin key: the cluster token, on the internal
// ports, whose callers (servers, agents) act on every tenant's objects.
func (k *Keys) AddAdmin(tenant, key string) {
	k.entries = append(k.entries, &keyEntry{sum: sha256.Sum256([]byte(key)), tenant: tenant, admin: true})
}

// Tenant returns a tenant's quotas (nil when it has none).
func (k *Keys) Tenant(name string) *Tenant {
	if k == nil {
		return nil
	}
	return k.tenants[name]
}

// Admins counts the admin keys.
func (k *Keys) Admins() int {
	n := 0
	for _, e := range k.entries {
		if e.admin {
			n++
		}
	}
	return n
}

// lookup returns the entry of key, comparing against every key in constant time.
func (k *Keys) lookup(key string) (*keyEntry, bool) {
	sum := sha256.Sum256([]byte(key))
	var found *keyEntry
	for _, e := range k.entries {
		if subtle.ConstantTimeCompare(sum[:], e.sum[:]) == 1 {
			found = e
		}
	}
	return found, found != nil
}

type principalKey struct{}

type principal struct {
	tenant string
	admin  bool
}

// Principal is the tenant of the key that authenticated the call ("" for
// calls that did not come through the public API's authentication).
func Principal(ctx context.Context) string {
	p, _ := ctx.Value(principalKey{}).(principal)
	return p.tenant
}

// IsAdmin reports whether the call's key is an admin key.
func IsAdmin(ctx context.Context) bool {
	p, _ := ctx.Value(principalKey{}).(principal)
	return p.admin
}

// CanSee reports whether the call may see an object of tenant: admins and
// internal calls see everything, others their own tenant's only.
func CanSee(ctx context.Context, tenant string) bool {
	p, ok := ctx.Value(principalKey{}).(principal)
	return !ok || p.admin || p.tenant == tenant
}

// WithPrincipal returns ctx as an authenticated call of tenant would carry
// it (for tests and in-process callers).
func WithPrincipal(ctx context.Context, tenant string, admin bool) context.Context {
	return context.WithValue(ctx, principalKey{}, principal{tenant: tenant, admin: admin})
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
	e, ok := a.keys.lookup(tok)
	if !ok {
		return ctx, connect.NewError(connect.CodeUnauthenticated, errors.New("invalid API key"))
	}
	if e.limit != nil && !e.limit.allow(time.Now()) {
		return ctx, connect.NewError(connect.CodeResourceExhausted,
			fmt.Errorf("this API key (tenant %s) is over its rate of %g calls a second; retry shortly", e.tenant, e.rate))
	}
	return WithPrincipal(ctx, e.tenant, e.admin), nil
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

// bucket is a token bucket: rate tokens a second, at most rate (and at
// least one) held.
type bucket struct {
	mu     sync.Mutex
	rate   float64
	tokens float64
	last   time.Time
}

func newBucket(rate float64) *bucket {
	return &bucket{rate: rate, tokens: max(rate, 1)}
}

func (b *bucket) allow(now time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.last.IsZero() {
		b.tokens = min(max(b.rate, 1), b.tokens+now.Sub(b.last).Seconds()*b.rate)
	}
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// adminProcedures are the calls only admin keys may make: managing
// templates and the cluster. Reading templates is for everyone.
var adminProcedures = map[string]bool{
	sandboxv1connect.TemplateServiceCreateTemplateProcedure: true,
	sandboxv1connect.TemplateServiceUpdateTemplateProcedure: true,
	sandboxv1connect.TemplateServiceDeleteTemplateProcedure: true,
}

func needsAdmin(procedure string) bool {
	return adminProcedures[procedure] || strings.HasPrefix(procedure, "/"+sandboxv1connect.ClusterServiceName+"/")
}

// adminOnly refuses the admin procedures to keys that are not admin keys;
// it runs after authentication.
type adminOnly struct{}

func (adminOnly) check(ctx context.Context, procedure string) error {
	if !needsAdmin(procedure) || IsAdmin(ctx) {
		return nil
	}
	return connect.NewError(connect.CodePermissionDenied, fmt.Errorf(
		"%s needs an admin key, and this key (tenant %s) is not one: templates and the cluster are managed with keys marked admin in the key file",
		procedure, Principal(ctx)))
}

func (a adminOnly) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if err := a.check(ctx, req.Spec().Procedure); err != nil {
			return nil, err
		}
		return next(ctx, req)
	}
}

func (adminOnly) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (a adminOnly) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		if err := a.check(ctx, conn.Spec().Procedure); err != nil {
			return err
		}
		return next(ctx, conn)
	}
}
