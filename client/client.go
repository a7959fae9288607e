package client

import (
	"beacon.dev/beacon/internal/backoff"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/net/http2"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/internal/wire"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/session"
)

// Errors callers act on. Errors returned by the client wrap one of these
// (or registry.ErrInvalid for bad input) with the server's message.
var (
	// ErrSessionExpired: the session's lease is gone (session.ErrLost).
	ErrSessionExpired = session.ErrLost
	// ErrUnavailable: no server could be reached or the registry is down;
	// retry later.
	ErrUnavailable = errors.New("beacon: registry unavailable")
	// ErrClosed: the Client, Session or Watcher was closed
	// (session.ErrClosed).
	ErrClosed = session.ErrClosed
	// ErrNotFound: the instance, or the ACL token, policy or role
	// (Client.ACL), does not exist.
	ErrNotFound = errors.New("beacon: not found")
	// ErrPermissionDenied: the token may not make the call; the message
	// names the permission it lacks.
	ErrPermissionDenied = errors.New("beacon: permission denied")
	// ErrUnauthenticated: the token is malformed, unknown or expired.
	ErrUnauthenticated = errors.New("beacon: unauthenticated")
)

// Option configures a Client.
type Option func(*Client)

// WithNamespace sets the namespace used when a call names none.
func WithNamespace(ns string) Option { return func(c *Client) { c.namespace = ns } }

// WithLogger sets the logger (default: discard).
func WithLogger(l *slog.Logger) Option { return func(c *Client) { c.log = l } }

// WithTLS talks to the servers over TLS with cfg (its RootCAs trust the
// servers' certificates; Certificates, if set, is the client's for mTLS).
// Addresses without a scheme then mean https://. See TLSFromFiles.
func WithTLS(cfg *tls.Config) Option { return func(c *Client) { c.tls = cfg.Clone() } }

// WithToken authenticates every call with an ACL token's secret (sent as
// "Authorization: Bearer SECRET"). A session's own calls use the
// session-bound credential the server gives it instead, so that what one
// session may do is bound to that session. Without a token, calls use the
// server's anonymous token.
func WithToken(secret string) Option { return func(c *Client) { c.token = secret } }

// WithHTTPClient replaces the HTTP client. It must speak HTTP/2 without
// TLS (h2c) to reach a beacon server.
func WithHTTPClient(h *http.Client) Option { return func(c *Client) { c.http = h } }

// WithOrderedServers makes the first server listed the client's home (see
// WithRebalanceInterval) and the next ones its fallbacks in order, for
// calls and streams alike — for a server on the same host, or a test that
// must know where calls go (grpc-go's pick_first keeps the list's order
// too). By default the home is picked at random and a stream leaving a
// server picks one of the others at random, so that clients given the
// same list spread evenly over the servers.
func WithOrderedServers() Option { return func(c *Client) { c.ordered = true } }

// DefaultRebalanceInterval is how often a client that left its home
// server checks whether it is back (WithRebalanceInterval).
const DefaultRebalanceInterval = 30 * time.Second

// WithRebalanceInterval sets how often (±50 %, at random) a client whose
// calls or streams left its home server — it failed, froze or restarted —
// checks the home's /readyz; once it answers, calls go home again at once
// and each watch stream and the heartbeat stream move back at a random
// moment within the next interval, resuming where they were, so that a
// restarted server gets its share of clients back gradually instead of
// never or all at once. 0 turns it off. Default DefaultRebalanceInterval.
func WithRebalanceInterval(d time.Duration) Option { return func(c *Client) { c.rebalanceEvery = d } }

// DefaultAttemptTimeout is how long one server may take to answer a call
// before the call moves on to the next server (WithAttemptTimeout).
const DefaultAttemptTimeout = time.Second

// DefaultWatchHeartbeat is how often a quiet watch stream hears from its
// server (WithWatchHeartbeat).
const DefaultWatchHeartbeat = time.Second

// WithAttemptTimeout sets how long one server may take to answer before a
// call, or a session's heartbeat, moves on to the next server (default
// 1s): a server that accepts connections but does not answer — frozen,
// swapping, its disk stalled — is treated like a dead one. The last
// server tried gets what remains of the caller's deadline, so with a
// single server nothing is cut short. Calls may therefore reach two
// servers; every call the client makes is safe to repeat.
func WithAttemptTimeout(d time.Duration) Option { return func(c *Client) { c.attemptTimeout = d } }

// WithWatchHeartbeat sets how often a watch stream's server sends a
// message when it has nothing else to send (default 1s, between 100ms and
// 1m). A stream that hears nothing for three heartbeats moves to the next
// server.
func WithWatchHeartbeat(d time.Duration) Option { return func(c *Client) { c.watchHeartbeat = d } }

// Client talks to beacon servers.
type Client struct {
	attemptTimeout time.Duration
	watchHeartbeat time.Duration
	namespace      string
	log            *slog.Logger
	http           *http.Client
	tls            *tls.Config // nil: h2c, cleartext
	token          string      // "" : the anonymous token
	ownsHTTP       bool
	conns          *connSet // the owned HTTP client's connections
	servers        []string
	rpcs           []beaconv1connect.RegistryServiceClient
	acls           []beaconv1connect.AclServiceClient  // by server, as rpcs
	kvs            []beaconv1connect.KVServiceClient   // by server, as rpcs
	locks          []beaconv1connect.LockServiceClient // by server, as rpcs
	current        atomic.Int64                        // index into rpcs of the server in use
	home           int64                               // index into rpcs of the server this client prefers
	ordered        bool                                // WithOrderedServers: home is the first
	rebalanceEvery time.Duration                       // WithRebalanceInterval; 0: never
	ka             *keepAliveStream
	stopRebalance  context.CancelFunc
	rebalancing    sync.WaitGroup

	isClosed atomic.Bool // set by Close: calls fail fast with ErrClosed
	mu       sync.Mutex
	closed   bool                          // guarded by mu
	sessions map[*session.Session]struct{} // guarded by mu; open ones, closed by Close
	creds    map[int64]string              // guarded by mu; session-bound credentials by session id
	watchers map[*Watcher]struct{}         // guarded by mu; running ones, closed by Close
	streams  map[streamCloser]struct{}     // guarded by mu; KV and leader watchers running, closed by Close
	turns    sync.Map                      // "session/ns/lock" → chan struct{}: Mutex's process-local turns
}

// New returns a client for the given server addresses ("host:port" or
// "http://host:port"). It does no I/O.
func New(servers []string, opts ...Option) (*Client, error) {
	c := &Client{namespace: registry.DefaultNamespace, attemptTimeout: DefaultAttemptTimeout, watchHeartbeat: DefaultWatchHeartbeat, rebalanceEvery: DefaultRebalanceInterval,
		sessions: map[*session.Session]struct{}{}, watchers: map[*Watcher]struct{}{}, streams: map[streamCloser]struct{}{}, creds: map[int64]string{}}
	for _, o := range opts {
		o(c)
	}
	if c.attemptTimeout <= 0 {
		return nil, fmt.Errorf("beacon: invalid attempt timeout %v: must be positive", c.attemptTimeout)
	}
	if c.watchHeartbeat < 100*time.Millisecond || c.watchHeartbeat > time.Minute {
		return nil, fmt.Errorf("beacon: invalid watch heartbeat %v: must be between 100ms and 1m", c.watchHeartbeat)
	}
	if i := strings.IndexFunc(c.token, func(r rune) bool { return r <= ' ' || r > '~' }); i >= 0 {
		// Sent anyway, the header is refused before any server sees it,
		// and the error reads as if none answered.
		return nil, fmt.Errorf("beacon: invalid token: a space or control character at byte %d: a token secret is one word", i)
	}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	if err := registry.ValidateNamespace(c.namespace); err != nil {
		return nil, fmt.Errorf("beacon: %w", err)
	}
	if c.http == nil {
		c.conns = &connSet{open: map[net.Conn]struct{}{}}
		c.http, c.ownsHTTP = newHTTPClient(c.conns, c.tls), true
	}
	scheme := "http://"
	if c.tls != nil {
		scheme = "https://"
	}
	for _, s := range servers {
		for _, part := range strings.Split(s, ",") {
			if part = strings.TrimSpace(part); part == "" {
				continue
			}
			if !strings.Contains(part, "://") {
				part = scheme + part
			}
			c.servers = append(c.servers, part)
			// No gzip: between services in one network it costs far more
			// CPU (on the server's fan-out above all) than it saves.
			opts := []connect.ClientOption{connect.WithGRPC(), connect.WithAcceptCompression("gzip", nil, nil), connect.WithInterceptors(tokenInterceptor{c})}
			c.rpcs = append(c.rpcs, beaconv1connect.NewRegistryServiceClient(c.http, part, opts...))
			c.acls = append(c.acls, beaconv1connect.NewAclServiceClient(c.http, part, opts...))
			c.kvs = append(c.kvs, beaconv1connect.NewKVServiceClient(c.http, part, opts...))
			c.locks = append(c.locks, beaconv1connect.NewLockServiceClient(c.http, part, opts...))
		}
	}
	if len(c.servers) == 0 {
		return nil, errors.New("beacon: invalid servers: need at least one address")
	}
	if c.rebalanceEvery < 0 {
		return nil, fmt.Errorf("beacon: invalid rebalance interval %v: must be 0 (off) or positive", c.rebalanceEvery)
	}
	if !c.ordered {
		c.home = rand.Int64N(int64(len(c.servers)))
	}
	c.current.Store(c.home)
	c.ka = newKeepAliveStream(c)
	rctx, stop := context.WithCancel(context.Background())
	c.stopRebalance = stop
	if len(c.servers) > 1 && c.rebalanceEvery > 0 {
		c.rebalancing.Add(1)
		go c.rebalance(rctx)
	}
	return c, nil
}

// otherServer picks the server a stream that failed on server from tries
// next: one of the others at random, so that the streams of a server that
// went away spread over the rest — or, WithOrderedServers, the next in
// the list.
func (c *Client) otherServer(from int64) int64 {
	n := int64(len(c.rpcs))
	if n == 1 || c.ordered {
		return (from + 1) % n
	}
	return (from + 1 + rand.Int64N(n-1)) % n
}

// rebalance brings the client's calls and streams back to its home server
// once it is ready again (WithRebalanceInterval).
func (c *Client) rebalance(ctx context.Context) {
	defer c.rebalancing.Done()
	for {
		every := c.rebalanceEvery
		if backoff.Sleep(ctx, every/2+rand.N(every)) != nil {
			return
		}
		away := c.awayFromHome()
		if len(away) == 0 && c.current.Load() == c.home {
			continue
		}
		if !c.homeReady(ctx) {
			continue
		}
		c.log.Info("beacon: home server ready again: moving back", "server", c.servers[c.home], "streams", len(away))
		c.current.Store(c.home)
		for _, move := range away {
			// Each at its own moment within the interval, so that the
			// clients of a restarted server do not all arrive together.
			if backoff.Sleep(ctx, rand.N(every)/time.Duration(max(1, len(away)))) != nil {
				return
			}
			move()
		}
	}
}

// awayFromHome returns a move for each stream of the client that is on
// another server than its home.
func (c *Client) awayFromHome() []func() {
	var moves []func()
	c.mu.Lock()
	for w := range c.watchers {
		if w.server.Load() != c.home {
			moves = append(moves, func() { w.move(c.home) })
		}
	}
	c.mu.Unlock()
	if srv, open := c.ka.onServer(); open && srv != c.home {
		moves = append(moves, func() { c.ka.leave(c.home) })
	}
	rand.Shuffle(len(moves), func(i, j int) { moves[i], moves[j] = moves[j], moves[i] })
	return moves
}

// homeReady asks the home server's /readyz, bounded by the attempt
// timeout.
func (c *Client) homeReady(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, c.attemptTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.servers[c.home]+"/readyz", nil)
	if err != nil {
		return false
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return false
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 4<<10))
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// newHTTPClient speaks HTTP/2 over cleartext with pings, so a server that
// vanished without closing the connection is noticed within seconds.
//
// It is x/net's HTTP/2 transport, not net/http's Transport with
// Protocols: when a connection dies under a request, net/http (Go 1.26)
// decides whether to retry by reading a flag its HTTP/2 writer may still
// be setting, a data race the race detector reports (seen when tests cut
// connections). x/net's transport retries only requests whose body was
// never touched, and has no such flag.
func newHTTPClient(conns *connSet, tlsCfg *tls.Config) *http.Client {
	dialer := &net.Dialer{Timeout: 3 * time.Second, KeepAlive: 15 * time.Second}
	return &http.Client{Transport: &http2.Transport{
		AllowHTTP:       tlsCfg == nil,
		TLSClientConfig: tlsCfg,
		DialTLSContext: func(ctx context.Context, network, addr string, cfg *tls.Config) (net.Conn, error) {
			raw, err := dialer.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			c, err := conns.add(raw)
			if err != nil || tlsCfg == nil {
				return c, err // h2c: no TLS
			}
			tc := tls.Client(c, cfg) // cfg: tlsCfg with ServerName and h2 set by the transport
			if err := tc.HandshakeContext(ctx); err != nil {
				tc.Close()
				return nil, err
			}
			return tc, nil
		},
		ReadIdleTimeout: 5 * time.Second,
		PingTimeout:     5 * time.Second,
	}}
}

// connSet tracks the connections of the client's own transport, so that
// Close can end them all: closing only the idle ones leaves a connection
// whose last stream was still being torn down, and its read goroutine,
// open until the server's idle timeout.
type connSet struct {
	mu     sync.Mutex
	open   map[net.Conn]struct{} // guarded by mu
	closed bool                  // guarded by mu
}

func (s *connSet) add(c net.Conn) (net.Conn, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		c.Close()
		return nil, ErrClosed
	}
	tc := &trackedConn{Conn: c, set: s}
	s.open[tc] = struct{}{}
	return tc, nil
}

func (s *connSet) closeAll() {
	s.mu.Lock()
	s.closed = true
	open := s.open
	s.open = nil
	s.mu.Unlock()
	for c := range open {
		c.(*trackedConn).Conn.Close()
	}
}

type trackedConn struct {
	net.Conn
	set *connSet
}

func (c *trackedConn) Close() error {
	c.set.mu.Lock()
	delete(c.set.open, c)
	c.set.mu.Unlock()
	return c.Conn.Close()
}

// Close closes every session (revoking its lease, within the attempt
// timeout per server) and watcher made from the client, ends the shared
// keepalive stream and releases idle connections. Later calls that start
// a session or a watch return ErrClosed.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closed = true
	sessions, watchers, streams := c.sessions, c.watchers, c.streams
	c.sessions, c.watchers, c.streams = nil, nil, nil
	c.mu.Unlock()
	for w := range watchers {
		w.Close()
	}
	for w := range streams {
		w.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.attemptTimeout*time.Duration(len(c.rpcs)))
	for s := range sessions {
		s.Close(ctx)
	}
	cancel()
	c.isClosed.Store(true)
	c.stopRebalance()
	c.rebalancing.Wait()
	c.ka.close()
	if c.ownsHTTP {
		c.http.CloseIdleConnections()
		c.conns.closeAll()
	}
	return nil
}

// own records a session for Close, and forgets those that have ended;
// false if the client is closed.
func (c *Client) own(s *session.Session) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	for o := range c.sessions {
		select {
		case <-o.Done():
			delete(c.sessions, o)
		default:
		}
	}
	c.sessions[s] = struct{}{}
	return true
}

// ownWatcher is own for a watcher.
// streamCloser is a watcher the client closes when it closes.
type streamCloser interface{ Close() }

// ownStream keeps w to close with the client; false when the client is
// closed already.
func (c *Client) ownStream(w streamCloser) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.streams[w] = struct{}{}
	return true
}

func (c *Client) disownStream(w streamCloser) {
	c.mu.Lock()
	delete(c.streams, w)
	c.mu.Unlock()
}

func (c *Client) ownWatcher(w *Watcher) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	for o := range c.watchers {
		select {
		case <-o.done:
			delete(c.watchers, o)
		default:
		}
	}
	c.watchers[w] = struct{}{}
	return true
}

// Namespace returns the client's default namespace.
func (c *Client) Namespace() string { return c.namespace }

// call runs f against the current server and, if that server is
// unreachable or gives no answer within the attempt timeout, against the
// others in turn; the last one tried has the rest of ctx. f must be safe
// to repeat.
func call[T any](ctx context.Context, c *Client, f func(context.Context, beaconv1connect.RegistryServiceClient) (T, error)) (T, error) {
	v, err := failover(ctx, c, c.rpcs, true, f)
	return v, fromConnectError(err)
}

// failover runs f against stubs[current], moving on to the next server
// as call describes. A call that must not happen twice (repeatable false)
// moves on only when its request never left — the connection to the
// server could not be made — and is never cut short by the attempt
// timeout: a server that took the request may have acted on it. The
// error is the API's (a *connect.Error), or one wrapping ErrUnavailable
// that says what every server answered.
func failover[S, T any](ctx context.Context, c *Client, stubs []S, repeatable bool, f func(context.Context, S) (T, error)) (T, error) {
	return failoverWithin(ctx, c, stubs, repeatable, c.attemptTimeout, f)
}

// failoverWithin is failover with another attempt timeout than the
// client's (a call that carries more work).
func failoverWithin[S, T any](ctx context.Context, c *Client, stubs []S, repeatable bool, attemptTimeout time.Duration, f func(context.Context, S) (T, error)) (T, error) {
	var zero T
	if c.isClosed.Load() {
		return zero, ErrClosed
	}
	var last error
	var unavailable []string // why each server could not be used
	n := int64(len(stubs))
	start := c.current.Load()
	for i := range n {
		idx := (start + i) % n
		actx, cancel := ctx, context.CancelFunc(func() {})
		bounded := i < n-1 && repeatable
		if bounded {
			// The attempt timeout, not the caller's deadline, is what ends
			// the attempt first?
			dl, ok := ctx.Deadline()
			bounded = !ok || dl.After(time.Now().Add(attemptTimeout))
			actx, cancel = context.WithTimeout(ctx, attemptTimeout)
		}
		v, err := f(actx, stubs[idx])
		// The server learns the attempt's deadline from the request and
		// may answer DeadlineExceeded a moment before actx's own timer
		// fires: that too is this attempt timing out, not the caller's
		// (when the caller's own deadline is the nearer one, it is the
		// caller's, and the call ends).
		timedOut := ctx.Err() == nil && (actx.Err() != nil || (bounded && connect.CodeOf(err) == connect.CodeDeadlineExceeded))
		cancel()
		if err == nil {
			c.current.Store(idx)
			return v, nil
		}
		last = err
		if ctx.Err() != nil || (!timedOut && connect.CodeOf(err) != connect.CodeUnavailable) || (!repeatable && !unsent(err)) {
			break
		}
		msg := err.Error()
		var ce *connect.Error
		if timedOut {
			msg = fmt.Sprintf("no answer within the attempt timeout (%v)", attemptTimeout)
			last = connect.NewError(connect.CodeUnavailable, errors.New(msg))
		} else if errors.As(err, &ce) {
			msg = ce.Message()
		}
		unavailable = append(unavailable, c.servers[idx]+": "+msg)
		c.suspect(idx)
	}
	if len(unavailable) > 1 && connect.CodeOf(last) == connect.CodeUnavailable {
		// Say what every server answered, not only the last one.
		return zero, fmt.Errorf("beacon: no server could serve the call (%s): %w", strings.Join(unavailable, "; "), ErrUnavailable)
	}
	return zero, last
}

// unsent reports whether a call's error shows that its request never
// reached a server: the connection could not be made.
func unsent(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

// suspect moves the client's calls off server idx, if they still go there,
// so that the next call does not wait on it first.
func (c *Client) suspect(idx int64) {
	c.current.CompareAndSwap(idx, (idx+1)%int64(len(c.rpcs)))
}

// fromConnectError maps API errors to the package's sentinels.
func fromConnectError(err error) error {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if !errors.As(err, &ce) {
		return err
	}
	switch ce.Code() {
	case connect.CodeInvalidArgument:
		return fmt.Errorf("beacon: %s: %w", ce.Message(), registry.ErrInvalid)
	case connect.CodeNotFound:
		return fmt.Errorf("beacon: %s: %w", ce.Message(), ErrSessionExpired)
	case connect.CodeUnavailable:
		return fmt.Errorf("beacon: %s: %w", ce.Message(), ErrUnavailable)
	case connect.CodePermissionDenied:
		// The server's message starts "permission denied: needs …".
		return fmt.Errorf("%w: %s", ErrPermissionDenied, strings.TrimPrefix(ce.Message(), "permission denied: "))
	case connect.CodeUnauthenticated:
		return fmt.Errorf("%w: %s", ErrUnauthenticated, ce.Message())
	case connect.CodeCanceled:
		return fmt.Errorf("beacon: %w", context.Canceled)
	case connect.CodeDeadlineExceeded:
		return fmt.Errorf("beacon: %w", context.DeadlineExceeded)
	}
	return fmt.Errorf("beacon: %w", err)
}

// CallOption adjusts one call. InNamespace applies to every call that
// addresses a namespace (the same way in each); All only to Instances;
// WatchFrom only to Watch.
type CallOption func(*callConfig)

type callConfig struct {
	namespace string
	all       bool
	from      []*registry.Snapshot
	fence     *beaconv1.Fence // Fenced: KV writes only
	rollouts  bool            // WithRollouts: KV watches only
}

// InNamespace addresses another namespace than the client's (WithNamespace,
// default "default"); "" means the client's.
func InNamespace(ns string) CallOption { return func(c *callConfig) { c.namespace = ns } }

// All makes Instances include instances that are not routable (not UP, or
// CRITICAL).
func All() CallOption { return func(c *callConfig) { c.all = true } }

func (c *Client) options(opts []CallOption) callConfig {
	cfg := callConfig{}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.namespace == "" {
		cfg.namespace = c.namespace
	}
	return cfg
}

// prepare fills defaults and validates locally, so bad input fails before
// any network round trip with the same error the server would give.
func (c *Client) prepare(in registry.Instance) (registry.Instance, error) {
	in = in.Clone()
	if in.Namespace == "" {
		in.Namespace = c.namespace
	}
	in.Revision = 0
	in.ApplyDefaults()
	if err := in.Validate(); err != nil {
		return in, fmt.Errorf("beacon: %w", err)
	}
	return in, nil
}

// Register registers a persistent instance: it stays until deregistered,
// whatever happens to this process.
func (c *Client) Register(ctx context.Context, in registry.Instance) (revision int64, err error) {
	in.SessionID = 0
	return c.register(ctx, in)
}

func (c *Client) register(ctx context.Context, in registry.Instance) (int64, error) {
	in, err := c.prepare(in)
	if err != nil {
		return 0, err
	}
	req := &beaconv1.RegisterRequest{Instance: wire.InstanceToProto(&in), SessionId: in.SessionID}
	return call(ctx, c, func(ctx context.Context, r beaconv1connect.RegistryServiceClient) (int64, error) {
		resp, err := r.Register(ctx, connect.NewRequest(req))
		if err != nil {
			return 0, err
		}
		return resp.Msg.GetRevision(), nil
	})
}

// Bounds of one RegisterBatch request the SDK sends: under the server's
// defaults (--max-register-batch 1000, --max-request-bytes 1 MiB), so
// that a long list goes as several requests rather than be refused.
const (
	batchMaxInstances = 500
	batchMaxBytes     = 256 << 10
)

// registerBatch registers ins (prepared: namespace set, validated) bound
// to session (0: persistent), in RegisterBatch requests of at most
// batchMaxInstances and batchMaxBytes. errs[i] is ins[i]'s refusal, as
// Register would return it; held[i] marks a refusal because another live
// session holds it. A request refused whole refuses its instances with
// that error; err is set only when the registry could not be reached or
// the session is gone (nothing can be said of the rest).
func (c *Client) registerBatch(ctx context.Context, session int64, ins []registry.Instance) (revs []int64, errs []error, held []bool, err error) {
	revs, errs, held = make([]int64, len(ins)), make([]error, len(ins)), make([]bool, len(ins))
	for start := 0; start < len(ins); {
		req := &beaconv1.RegisterBatchRequest{SessionId: session}
		size := 0
		end := start
		for ; end < len(ins) && end-start < batchMaxInstances; end++ {
			m := wire.InstanceToProto(&ins[end])
			n := proto.Size(m)
			if end > start && size+n > batchMaxBytes {
				break
			}
			size += n
			req.Instances = append(req.Instances, m)
		}
		results, err := c.registerChunk(ctx, req)
		switch {
		case err != nil && (errors.Is(err, ErrSessionExpired) || errors.Is(err, ErrUnavailable) || ctx.Err() != nil):
			return nil, nil, nil, err
		case err != nil:
			for i := start; i < end; i++ {
				errs[i] = err
			}
		default:
			for j, r := range results {
				i := start + j
				revs[i], held[i] = r.GetRevision(), r.GetHeld()
				if r.GetErrorCode() != 0 {
					errs[i] = fromConnectError(connect.NewError(connect.Code(r.GetErrorCode()), errors.New(r.GetError())))
				}
			}
		}
		start = end
	}
	return revs, errs, held, nil
}

// registerChunk sends one RegisterBatch request.
func (c *Client) registerChunk(ctx context.Context, req *beaconv1.RegisterBatchRequest) ([]*beaconv1.RegisterResult, error) {
	// A batch is group-committed in transactions of 64: give a server the
	// attempt timeout per 64 instances before moving on.
	within := c.attemptTimeout * time.Duration(1+len(req.Instances)/64)
	results, err := failoverWithin(ctx, c, c.rpcs, true, within, func(ctx context.Context, r beaconv1connect.RegistryServiceClient) ([]*beaconv1.RegisterResult, error) {
		resp, err := r.RegisterBatch(ctx, connect.NewRequest(req))
		if err != nil {
			return nil, err
		}
		return resp.Msg.GetResults(), nil
	})
	if err == nil && len(results) != len(req.Instances) {
		return nil, fmt.Errorf("beacon: RegisterBatch answered %d results for %d instances: %w", len(results), len(req.Instances), ErrUnavailable)
	}
	return results, fromConnectError(err)
}

// Deregister removes an instance, ephemeral or persistent. found reports
// whether it existed.
func (c *Client) Deregister(ctx context.Context, service, id string, opts ...CallOption) (found bool, err error) {
	return c.deregister(ctx, c.options(opts).namespace, service, id, 0)
}

// deregister with session != 0 removes the instance only if it is still
// bound to that session.
func (c *Client) deregister(ctx context.Context, namespace, service, id string, session int64) (bool, error) {
	if namespace == "" {
		namespace = c.namespace
	}
	req := &beaconv1.DeregisterRequest{Namespace: namespace, Service: service, Id: id, SessionId: session}
	return call(ctx, c, func(ctx context.Context, r beaconv1connect.RegistryServiceClient) (bool, error) {
		resp, err := r.Deregister(ctx, connect.NewRequest(req))
		if err != nil {
			return false, err
		}
		return resp.Msg.GetFound(), nil
	})
}

// Instances returns a service's snapshot: its routable instances, or all of
// them with All(). The read sees every write acknowledged before it began.
func (c *Client) Instances(ctx context.Context, service string, opts ...CallOption) (*registry.Snapshot, error) {
	cfg := c.options(opts)
	req := &beaconv1.ListInstancesRequest{Namespace: cfg.namespace, Service: service, All: cfg.all}
	return call(ctx, c, func(ctx context.Context, r beaconv1connect.RegistryServiceClient) (*registry.Snapshot, error) {
		resp, err := r.ListInstances(ctx, connect.NewRequest(req))
		if err != nil {
			return nil, err
		}
		// Without All, the instances are Available: the routable ones, or
		// under the protection threshold every UP one (Health tells).
		snap := wire.SnapshotFromProto(&beaconv1.ServiceSnapshot{
			Namespace: req.Namespace, Service: service,
			Revision: resp.Msg.GetRevision(), Instances: resp.Msg.GetInstances(),
			ProtectionThreshold: resp.Msg.GetProtectionThreshold(),
		})
		snap.Filtered = resp.Msg.GetResultsFiltered()
		return snap, nil
	})
}

// ServiceSummary describes one service.
type ServiceSummary struct {
	Name      string
	Instances int
	Routable  int
	Revision  int64
}

// Services lists the services of the namespace that have at least one
// instance.
func (c *Client) Services(ctx context.Context, opts ...CallOption) ([]ServiceSummary, error) {
	req := &beaconv1.ListServicesRequest{Namespace: c.options(opts).namespace}
	return call(ctx, c, func(ctx context.Context, r beaconv1connect.RegistryServiceClient) ([]ServiceSummary, error) {
		resp, err := r.ListServices(ctx, connect.NewRequest(req))
		if err != nil {
			return nil, err
		}
		out := make([]ServiceSummary, 0, len(resp.Msg.GetServices()))
		for _, s := range resp.Msg.GetServices() {
			out = append(out, ServiceSummary{Name: s.GetName(), Instances: int(s.GetInstances()), Routable: int(s.GetRoutable()), Revision: s.GetRevision()})
		}
		return out, nil
	})
}

// WatchersResult is what AwaitWatchers saw across the servers.
type WatchersResult struct {
	// Watchers counts the acknowledging watch streams of the service when
	// the wait began; Acknowledged of those applied the revision; Gone
	// disconnected first.
	Watchers, Acknowledged, Gone int
	// Unreachable counts servers that could not be asked: watchers on them
	// are not counted.
	Unreachable int
	Elapsed     time.Duration
}

// Complete reports whether every watcher that could be asked and is still
// connected applied the revision.
func (r WatchersResult) Complete() bool {
	return r.Unreachable == 0 && r.Acknowledged+r.Gone == r.Watchers
}

// AwaitWatchers waits, at most timeout, until the SDK watchers of the
// service (on every server this client knows, since each
// watcher streams from one of them) have applied revision — typically the
// one Register returned when an instance was marked DRAINING.
func (c *Client) AwaitWatchers(ctx context.Context, service string, revision int64, timeout time.Duration, opts ...CallOption) (WatchersResult, error) {
	start := time.Now()
	// Each server is asked to answer a little before timeout, and one that
	// has not answered by timeout (frozen, cut off) is counted unreachable:
	// the wait never outlasts timeout.
	grace := min(timeout/10, 250*time.Millisecond)
	req := &beaconv1.AwaitWatchersRequest{Namespace: c.options(opts).namespace, Service: service, Revision: revision, Timeout: durationpb.New(timeout - grace)}
	var (
		mu     sync.Mutex
		res    WatchersResult
		badReq error
		wg     sync.WaitGroup
	)
	for _, rpc := range c.rpcs {
		wg.Go(func() {
			cctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			resp, err := rpc.AwaitWatchers(cctx, connect.NewRequest(req))
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				if connect.CodeOf(err) == connect.CodeInvalidArgument {
					badReq = fromConnectError(err)
				}
				res.Unreachable++
				return
			}
			res.Watchers += int(resp.Msg.GetWatchers())
			res.Acknowledged += int(resp.Msg.GetAcknowledged())
			res.Gone += int(resp.Msg.GetGone())
		})
	}
	wg.Wait()
	res.Elapsed = time.Since(start)
	if badReq != nil {
		return res, badReq
	}
	if ctx.Err() != nil {
		return res, ctx.Err()
	}
	return res, nil
}

// SetStatus changes an instance's declared status in place, keeping its
// session and checks — the operator's maintenance switch: OUT_OF_SERVICE
// stays when the instance registers again, until SetStatus puts it back.
func (c *Client) SetStatus(ctx context.Context, service, id string, status registry.Status, opts ...CallOption) (*registry.Instance, error) {
	req := &beaconv1.SetStatusRequest{Namespace: c.options(opts).namespace, Service: service, Id: id, Status: beaconv1.Status(status)}
	ctx = c.ownerCredential(ctx, registry.InstanceKey{Namespace: req.Namespace, Service: service, ID: id})
	return call(ctx, c, func(ctx context.Context, r beaconv1connect.RegistryServiceClient) (*registry.Instance, error) {
		resp, err := r.SetStatus(ctx, connect.NewRequest(req))
		if connect.CodeOf(err) == connect.CodeNotFound {
			return nil, fmt.Errorf("instance %s/%s/%s: %w", req.Namespace, service, id, ErrNotFound)
		}
		if err != nil {
			return nil, err
		}
		in := wire.InstanceFromProto(resp.Msg.GetInstance())
		return &in, nil
	})
}

// SetProtectionThreshold sets a service's protection threshold in [0, 1]
// (0: off): below that share of routable instances among those declared
// UP, discovery hands out the unhealthy ones too.
func (c *Client) SetProtectionThreshold(ctx context.Context, service string, threshold float64, opts ...CallOption) (revision int64, err error) {
	if err := registry.ValidateProtectionThreshold(threshold); err != nil {
		return 0, err
	}
	return c.setServiceConfig(ctx, &beaconv1.SetServiceConfigRequest{Namespace: c.options(opts).namespace, Service: service, ProtectionThreshold: threshold})
}

// ResetProtectionThreshold forgets the service's own protection threshold:
// the server's default (--protection-threshold) applies again.
func (c *Client) ResetProtectionThreshold(ctx context.Context, service string, opts ...CallOption) (revision int64, err error) {
	return c.setServiceConfig(ctx, &beaconv1.SetServiceConfigRequest{Namespace: c.options(opts).namespace, Service: service, UseDefault: true})
}

// ServiceConfig is a service's settings.
type ServiceConfig struct {
	// ProtectionThreshold is the threshold in effect: the service's own,
	// or the server's default when ProtectionThresholdDefault.
	ProtectionThreshold        float64
	ProtectionThresholdDefault bool
	// Policy is what the service's xDS clients follow (docs/xds.md).
	Policy registry.ServicePolicy
	// Revision is the etcd revision the settings were read or written at.
	Revision int64
}

// PolicyChange names the parts of a service's policy to set; the nil ones
// are left as they are. A zero value set is that part's default.
type PolicyChange struct {
	LoadBalancing    *registry.LoadBalancing
	Retry            *registry.RetryPolicy
	OutlierDetection *registry.OutlierDetection
}

// SetServicePolicy changes the balancing, retry and outlier-detection
// policies a service's xDS clients follow (docs/xds.md), leaving its
// protection threshold and the parts change does not name as they are. It
// returns the service's settings after the change. A server that predates
// policies answers with an error (Unimplemented).
func (c *Client) SetServicePolicy(ctx context.Context, service string, change PolicyChange, opts ...CallOption) (ServiceConfig, error) {
	req := &beaconv1.SetServicePolicyRequest{Namespace: c.options(opts).namespace, Service: service}
	if lb := change.LoadBalancing; lb != nil {
		if err := lb.Validate(); err != nil {
			return ServiceConfig{}, err
		}
		req.LoadBalancing = wire.LoadBalancingToProto(*lb)
	}
	if r := change.Retry; r != nil {
		if err := r.Validate(); err != nil {
			return ServiceConfig{}, err
		}
		req.RetryPolicy = wire.RetryPolicyToProto(*r)
		if req.RetryPolicy == nil {
			req.RetryPolicy = &beaconv1.RetryPolicy{} // given, and empty: no retries
		}
	}
	if od := change.OutlierDetection; od != nil {
		if err := od.Validate(); err != nil {
			return ServiceConfig{}, err
		}
		req.OutlierDetection = wire.OutlierDetectionToProto(*od)
	}
	return call(ctx, c, func(ctx context.Context, r beaconv1connect.RegistryServiceClient) (ServiceConfig, error) {
		resp, err := r.SetServicePolicy(ctx, connect.NewRequest(req))
		if err != nil {
			return ServiceConfig{}, err
		}
		return serviceConfigFromProto(resp.Msg.GetConfig(), resp.Msg.GetRevision())
	})
}

// GetServiceConfig returns a service's settings.
func (c *Client) GetServiceConfig(ctx context.Context, service string, opts ...CallOption) (ServiceConfig, error) {
	req := &beaconv1.GetServiceConfigRequest{Namespace: c.options(opts).namespace, Service: service}
	return call(ctx, c, func(ctx context.Context, r beaconv1connect.RegistryServiceClient) (ServiceConfig, error) {
		resp, err := r.GetServiceConfig(ctx, connect.NewRequest(req))
		if err != nil {
			return ServiceConfig{}, err
		}
		return serviceConfigFromProto(resp.Msg.GetConfig(), resp.Msg.GetRevision())
	})
}

func serviceConfigFromProto(m *beaconv1.ServiceConfig, rev int64) (ServiceConfig, error) {
	p, err := wire.ServicePolicyFromProto(m)
	if err != nil {
		return ServiceConfig{}, fmt.Errorf("beacon: the server's service settings: %w", err)
	}
	return ServiceConfig{ProtectionThreshold: m.GetProtectionThreshold(), ProtectionThresholdDefault: m.GetProtectionThresholdDefault(), Policy: p, Revision: rev}, nil
}

func (c *Client) setServiceConfig(ctx context.Context, req *beaconv1.SetServiceConfigRequest) (int64, error) {
	return call(ctx, c, func(ctx context.Context, r beaconv1connect.RegistryServiceClient) (int64, error) {
		resp, err := r.SetServiceConfig(ctx, connect.NewRequest(req))
		if err != nil {
			return 0, err
		}
		return resp.Msg.GetRevision(), nil
	})
}

// UpdateCheck pushes the status of an instance's TTL check (named "ttl"
// unless check says otherwise) and renews its TTL: call it more often
// than the check's interval, or the registry marks the check CRITICAL.
// revision is that of the transition written, 0 when the status did not
// change.
func (c *Client) UpdateCheck(ctx context.Context, service, id, check string, status registry.Health, output string, opts ...CallOption) (revision int64, err error) {
	req := &beaconv1.UpdateCheckRequest{Namespace: c.options(opts).namespace, Service: service, Id: id, Check: check, Status: beaconv1.Health(status), Output: output}
	ctx = c.ownerCredential(ctx, registry.InstanceKey{Namespace: req.Namespace, Service: service, ID: id})
	return call(ctx, c, func(ctx context.Context, r beaconv1connect.RegistryServiceClient) (int64, error) {
		resp, err := r.UpdateCheck(ctx, connect.NewRequest(req))
		if connect.CodeOf(err) == connect.CodeNotFound {
			return 0, fmt.Errorf("instance %s/%s/%s: %w", req.Namespace, service, id, ErrNotFound)
		}
		if err != nil {
			return 0, err
		}
		return resp.Msg.GetRevision(), nil
	})
}
