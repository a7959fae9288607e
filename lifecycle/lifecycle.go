// Package lifecycle runs a gRPC server, an HTTP server or both the way a
// service behind beacon should run: it listens first, registers only once
// the readiness checks pass, and on SIGTERM, SIGINT or cancellation it
// drains — marks the instance DRAINING, waits (bounded) until the clients
// watching it have applied that, lets in-flight requests finish (bounded),
// deregisters and ends its session — so that no caller sees an error.
package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"

	"beacon.dev/beacon/backend"
	beaconbackend "beacon.dev/beacon/backend/beacon"
	"beacon.dev/beacon/beacongrpc"
	"beacon.dev/beacon/beaconhttp"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/backoff"
	"beacon.dev/beacon/registry"
)

// Defaults of Config's bounds.
const (
	DefaultAckTimeout  = 5 * time.Second
	DefaultStopTimeout = 10 * time.Second
	// DefaultWorkerStopTimeout is above an event consumer's default drain
	// (10 s) and the commit and group leave that follow.
	DefaultWorkerStopTimeout = 30 * time.Second
	DefaultReadyTimeout      = time.Minute
)

// Config describes the service to run. Client (or Backend), Instance.Service
// and at least one server with its listener are required.
type Config struct {
	// Client registers with beacon servers; the drain then waits for the
	// watchers' acknowledgements.
	Client *client.Client
	// Backend, instead of Client, registers with any registry (etcd
	// directly, memory, …). Without acknowledgements the drain waits
	// DrainDelay only; a *beacon backend still gets them.
	Backend backend.Backend
	// Instance is registered with the status UP once ready. Address
	// defaults to the listener's host and Port to its port; an ID is
	// derived from them when empty.
	Instance registry.Instance
	// HTTPService names the instance registered for the HTTP listener when
	// a process runs both servers (default Instance.Service + "-http").
	HTTPService string

	GRPC         *grpc.Server
	GRPCListener net.Listener
	// GRPCHealth is the server's grpc.health.v1 service; when nil and GRPC
	// is set, Run registers one before serving.
	GRPCHealth *beacongrpc.Health

	HTTP         *http.Server
	HTTPListener net.Listener
	// HTTPHealth follows the lifecycle. Left nil, Run makes one and wraps
	// HTTP's handler with it (beaconhttp.Health.Wrap: /livez, /readyz and
	// /healthz, and in-flight counting); set, it is yours to wire.
	HTTPHealth *beaconhttp.Health

	// Workers run beside the servers, from the start, until the drain:
	// each one's context ends once the instance is DRAINING and its
	// watchers acknowledged it, together with the servers' stop, and Run
	// waits for them — within WorkerStopTimeout (default 30 s; keep it
	// above a consumer's DrainTimeout and the time to commit and leave)
	// — before it deregisters. An event consumer is one
	// (events.Consumer.Run: it then finishes what is in flight, commits
	// and leaves its group). A worker that fails stops the service as a
	// failing server does; one that fails during the drain is in
	// Report.WorkerErr.
	Workers           []func(context.Context) error
	WorkerStopTimeout time.Duration

	// Ready is polled every ReadyInterval (default 100ms), for at most
	// ReadyTimeout, until it returns nil; nil means ready at once.
	Ready         func(context.Context) error
	ReadyInterval time.Duration
	ReadyTimeout  time.Duration

	SessionTTL time.Duration // default: the client's default
	// AckTimeout bounds the wait for watchers to apply DRAINING.
	AckTimeout time.Duration
	// DrainDelay is an extra pause after the acknowledgements, for callers
	// that do not watch beacon (load balancers polling /readyz).
	DrainDelay time.Duration
	// StopTimeout bounds how long in-flight requests may take to finish.
	StopTimeout time.Duration
	// Signals start the drain (default SIGTERM and SIGINT).
	Signals []os.Signal

	// Logger (default slog.Default(): a service's runner says when it
	// cannot register).
	Logger *slog.Logger
	// OnState, when set, is called on every state change.
	OnState func(beaconhttp.State)
}

// Report says how a run went.
type Report struct {
	// Registered lists the instances as registered.
	Registered []registry.Instance
	// Acks is what the drain saw of the watchers of the instances.
	Acks client.WatchersResult
	// AckWait is how long the drain waited for acknowledgements.
	AckWait time.Duration
	// RegisterErr is why the last attempt to register failed (nil once
	// registered); RegisterAttempts counts the attempts. Run logs each
	// failure, and returns RegisterErr if it stops before any registration
	// was confirmed (a wrong registry address, say).
	RegisterErr      error
	RegisterAttempts int
	// DrainErr is why the drain could not be announced (registry down):
	// callers then learn of the stop from refused connections, which the
	// SDK retries.
	DrainErr error
	// StopClean reports whether in-flight requests finished in time.
	StopClean bool
	// Stopping is the time from the stop signal to the end of Run.
	Stopping time.Duration
	// WorkerErr is the first error a worker returned during the drain, or
	// one returned just before it that did not stop the service (another
	// error did).
	WorkerErr error
}

func (c *Config) setDefaults() error {
	if (c.Client == nil) == (c.Backend == nil) {
		return errors.New("lifecycle: invalid Client/Backend: exactly one is required")
	}
	if b, ok := c.Backend.(*beaconbackend.Backend); ok {
		c.Client = b.Client() // acknowledged drains
	}
	if c.GRPC == nil && c.HTTP == nil {
		return errors.New("lifecycle: invalid GRPC/HTTP: at least one server is required")
	}
	if (c.GRPC != nil) != (c.GRPCListener != nil) || (c.HTTP != nil) != (c.HTTPListener != nil) {
		return errors.New("lifecycle: invalid listeners: each server needs its listener")
	}
	if err := registry.ValidateName("Instance.Service", c.Instance.Service); err != nil {
		return fmt.Errorf("lifecycle: %w", err)
	}
	if c.HTTPService == "" {
		c.HTTPService = c.Instance.Service + "-http"
	}
	if c.HTTPHealth == nil {
		c.HTTPHealth = new(beaconhttp.Health)
		if c.HTTP != nil {
			next := c.HTTP.Handler
			if next == nil {
				next = http.DefaultServeMux
			}
			c.HTTP.Handler = c.HTTPHealth.Wrap(next)
		}
	}
	if c.ReadyInterval <= 0 {
		c.ReadyInterval = 100 * time.Millisecond
	}
	if c.ReadyTimeout <= 0 {
		c.ReadyTimeout = DefaultReadyTimeout
	}
	if c.AckTimeout <= 0 {
		c.AckTimeout = DefaultAckTimeout
	}
	if c.StopTimeout <= 0 {
		c.StopTimeout = DefaultStopTimeout
	}
	if c.WorkerStopTimeout <= 0 {
		c.WorkerStopTimeout = DefaultWorkerStopTimeout
	}
	if len(c.Signals) == 0 {
		c.Signals = []os.Signal{syscall.SIGTERM, os.Interrupt}
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return nil
}

// instances returns what to register: one instance per listener.
func (c *Config) instances() ([]registry.Instance, error) {
	var out []registry.Instance
	add := func(service string, ln net.Listener) error {
		in := c.Instance
		in.Service = service
		host, portStr, err := net.SplitHostPort(ln.Addr().String())
		if err != nil {
			return err
		}
		port, err := strconv.Atoi(portStr)
		if err != nil {
			return err
		}
		if in.Address == "" {
			if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
				return fmt.Errorf("invalid Instance.Address: required when listening on %s", ln.Addr())
			}
			in.Address = host
		}
		if in.Port == 0 || len(out) > 0 { // the second listener has its own port
			in.Port = port
		}
		if in.ID == "" { // both instances share it: they are in different services
			in.ID = fmt.Sprintf("%s-%d", in.Address, in.Port)
			c.Instance.ID = in.ID
		}
		in.Status = registry.StatusUp
		out = append(out, in)
		return nil
	}
	if c.GRPC != nil {
		if err := add(c.Instance.Service, c.GRPCListener); err != nil {
			return nil, err
		}
	}
	if c.HTTP != nil {
		name := c.HTTPService
		if c.GRPC == nil {
			name = c.Instance.Service
		}
		if err := add(name, c.HTTPListener); err != nil {
			return nil, err
		}
	}
	return out, nil
}

type runner struct {
	cfg Config
	log *slog.Logger
}

func (r *runner) setState(s beaconhttp.State) {
	r.cfg.HTTPHealth.Set(s)
	if r.cfg.GRPCHealth != nil && s <= beaconhttp.Draining {
		r.cfg.GRPCHealth.SetServing(s == beaconhttp.Serving)
	}
	r.log.Info("lifecycle: state", "state", s.String())
	if r.cfg.OnState != nil {
		r.cfg.OnState(s)
	}
}

// Run serves until a stop signal or ctx ends, then drains and stops. It
// returns nil after a clean stop (exit 0); an error when the service could
// not start or a server failed.
func Run(ctx context.Context, cfg Config) (Report, error) {
	var rep Report
	if err := cfg.setDefaults(); err != nil {
		return rep, err
	}
	instances, err := cfg.instances()
	if err != nil {
		return rep, fmt.Errorf("lifecycle: %w", err)
	}
	r := &runner{cfg: cfg, log: cfg.Logger}
	if cfg.GRPC != nil && cfg.GRPCHealth == nil {
		// The overall status, and each name a probe may ask for: the
		// beacon service and every gRPC service the server carries
		// (grpc-health-probe -service=orders.v1.Orders).
		names := []string{cfg.Instance.Service}
		for name := range cfg.GRPC.GetServiceInfo() {
			names = append(names, name)
		}
		slices.Sort(names)
		r.cfg.GRPCHealth = beacongrpc.RegisterHealth(cfg.GRPC, slices.Compact(names)...)
	}
	r.setState(beaconhttp.Starting)

	stopCtx, stopSignals := signal.NotifyContext(ctx, cfg.Signals...)
	defer stopSignals()

	// Listen and serve at once; nothing is registered yet, so only probes
	// (and callers that were told the address by other means) arrive.
	serveErr := make(chan error, 2+len(cfg.Workers))
	var serving sync.WaitGroup
	if cfg.GRPC != nil {
		serving.Go(func() {
			if err := cfg.GRPC.Serve(cfg.GRPCListener); err != nil {
				serveErr <- fmt.Errorf("lifecycle: gRPC server: %w", err)
			}
		})
	}
	if cfg.HTTP != nil {
		serving.Go(func() {
			if err := cfg.HTTP.Serve(cfg.HTTPListener); err != nil && !errors.Is(err, http.ErrServerClosed) {
				serveErr <- fmt.Errorf("lifecycle: HTTP server: %w", err)
			}
		})
	}

	workCtx, stopWork := context.WithCancel(context.WithoutCancel(ctx))
	defer stopWork()
	var working sync.WaitGroup
	var werrMu sync.Mutex
	stopping := false // guarded by werrMu: the drain began, errors go to the report
	var werr error    // guarded by werrMu: a worker's error during the drain
	for i, w := range cfg.Workers {
		working.Go(func() {
			err := w(workCtx)
			werrMu.Lock()
			defer werrMu.Unlock()
			switch {
			case err == nil && !stopping:
				r.log.Warn("lifecycle: a worker returned before the drain; the service goes on without it", "worker", i)
			case err == nil:
			case !stopping:
				serveErr <- &workerError{fmt.Errorf("lifecycle: worker %d: %w", i, err)} // buffered for every worker: never blocks
			case werr == nil:
				werr = fmt.Errorf("lifecycle: worker %d: %w", i, err)
			}
		})
	}

	var sess *backend.Session
	runErr := r.start(stopCtx, serveErr, instances, &sess, &rep)
	if runErr == nil {
		select {
		case <-stopCtx.Done():
		case runErr = <-serveErr:
		}
	}
	var we *workerError
	if errors.As(runErr, &we) {
		runErr = we.err // as the worker's error always was
	}
	werrMu.Lock()
	stopping = true
	werrMu.Unlock()
	stopAt := time.Now()
	// A second SIGTERM or Ctrl-C during the drain kills the process, as
	// the default handling does.
	stopSignals()
	r.log.Info("lifecycle: stopping", "err", runErr)
	r.setState(beaconhttp.Draining)
	// The drain must run to its bounds even though stopCtx has ended.
	drainCtx := context.WithoutCancel(ctx)
	if sess != nil {
		r.drain(drainCtx, sess, rep.Registered, &rep)
	}
	stopWork()
	workersDue := time.Now().Add(cfg.WorkerStopTimeout)
	rep.StopClean = r.stopServers(drainCtx)
	serving.Wait()
	if !r.awaitWorkers(&working, workersDue) {
		rep.StopClean = false
	}
	werrMu.Lock()
	rep.WorkerErr = werr
	werrMu.Unlock()
	// A worker that failed just before the drain began (while something
	// else began it) left its error unread: it is the report's too.
unread:
	for rep.WorkerErr == nil {
		select {
		case err := <-serveErr:
			var we *workerError
			if errors.As(err, &we) {
				rep.WorkerErr = we.err
			}
		default:
			break unread
		}
	}
	r.setState(beaconhttp.Stopped)
	if sess != nil {
		cctx, cancel := context.WithTimeout(drainCtx, 5*time.Second)
		for _, in := range rep.Registered {
			if _, err := sess.Deregister(cctx, in.Service, in.ID); err != nil {
				r.log.Warn("lifecycle: deregistering (the session's end removes it)", "instance", in.ID, "err", err)
			}
		}
		if err := sess.Close(cctx); err != nil {
			r.log.Warn("lifecycle: closing the session (it expires after its TTL)", "err", err)
		}
		cancel()
	}
	if runErr == nil && len(rep.Registered) == 0 && rep.RegisterErr != nil {
		runErr = fmt.Errorf("lifecycle: stopped before any registration was confirmed (%d attempts; the last to fail: %w)", rep.RegisterAttempts, rep.RegisterErr)
	}
	rep.Stopping = time.Since(stopAt)
	r.log.Info("lifecycle: stopped", "in", rep.Stopping, "watchers", rep.Acks.Watchers, "acknowledged", rep.Acks.Acknowledged, "ack_wait", rep.AckWait, "clean", rep.StopClean)
	return rep, runErr
}

// start waits for readiness, then opens a session and registers UP,
// retrying while the registry is unreachable. It returns early (nil) when
// stopCtx ends, and an error when readiness never came or a server failed.
func (r *runner) start(stopCtx context.Context, serveErr <-chan error, instances []registry.Instance, sess **backend.Session, rep *Report) error {
	if err := r.awaitReady(stopCtx, serveErr); err != nil {
		return err
	}
	if stopCtx.Err() != nil {
		return nil
	}
	r.setState(beaconhttp.Serving)
	retry := backoff.New(backoff.Config{Base: 100 * time.Millisecond, Max: 5 * time.Second})
	for {
		rep.RegisterAttempts++
		err := r.register(stopCtx, instances, sess, rep)
		if err == nil {
			rep.RegisterErr = nil
			return nil
		}
		if stopCtx.Err() != nil {
			return nil // interrupted: RegisterErr keeps the last failure
		}
		rep.RegisterErr = err
		if errors.Is(err, registry.ErrInvalid) {
			return fmt.Errorf("lifecycle: registering: %w", err)
		}
		wait := retry.Next()
		r.log.Warn("lifecycle: registry unreachable, serving unregistered and retrying", "err", err, "in", wait)
		if over, err := pause(stopCtx, serveErr, wait); over {
			return err
		}
	}
}

func (r *runner) awaitReady(stopCtx context.Context, serveErr <-chan error) error {
	if r.cfg.Ready == nil {
		return nil
	}
	deadline := time.Now().Add(r.cfg.ReadyTimeout)
	for {
		err := r.cfg.Ready(stopCtx)
		if err == nil || stopCtx.Err() != nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("lifecycle: not ready after %v: %w", r.cfg.ReadyTimeout, err)
		}
		if over, err := pause(stopCtx, serveErr, r.cfg.ReadyInterval); over {
			return err
		}
	}
}

// pause waits d; it reports over when the run must end instead — stopCtx
// ended (err nil: a normal stop) or a server failed (err).
func pause(stopCtx context.Context, serveErr <-chan error, d time.Duration) (over bool, err error) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-stopCtx.Done():
		return true, nil
	case err := <-serveErr:
		return true, err
	case <-t.C:
		return false, nil
	}
}

func (r *runner) register(ctx context.Context, instances []registry.Instance, sess **backend.Session, rep *Report) error {
	if *sess == nil {
		var opts []client.SessionOption
		if r.cfg.SessionTTL > 0 {
			opts = append(opts, client.WithTTL(r.cfg.SessionTTL))
		}
		var s *backend.Session
		var err error
		if r.cfg.Backend != nil {
			s, err = r.cfg.Backend.NewSession(ctx, opts...)
		} else {
			s, err = r.cfg.Client.NewSession(ctx, opts...)
		}
		if err != nil {
			return err
		}
		*sess = s
	}
	for _, in := range instances[len(rep.Registered):] {
		if _, err := (*sess).Register(ctx, in); err != nil {
			return err
		}
		rep.Registered = append(rep.Registered, in)
		r.log.Info("lifecycle: registered", "service", in.Service, "id", in.ID, "addr", net.JoinHostPort(in.Address, strconv.Itoa(in.Port)))
	}
	return nil
}

// drain marks every registered instance DRAINING and waits until the
// watchers have applied it.
func (r *runner) drain(ctx context.Context, sess *backend.Session, registered []registry.Instance, rep *Report) {
	start := time.Now()
	defer func() { rep.AckWait = time.Since(start) }()
	type mark struct {
		in  registry.Instance
		rev int64
	}
	var marks []mark
	for _, in := range registered {
		in.Status = registry.StatusDraining
		cctx, cancel := context.WithTimeout(ctx, r.cfg.AckTimeout)
		rev, err := sess.Register(cctx, in)
		cancel()
		if err != nil {
			rep.DrainErr = err
			r.log.Warn("lifecycle: could not announce the drain", "instance", in.ID, "err", err)
			continue
		}
		marks = append(marks, mark{in, rev})
	}
	for _, m := range marks {
		if r.cfg.Client == nil {
			break // this registry cannot tell who applied the change: DrainDelay only
		}
		remaining := r.cfg.AckTimeout - time.Since(start)
		if remaining <= 0 {
			break
		}
		res, err := r.cfg.Client.AwaitWatchers(ctx, m.in.Service, m.rev, remaining, client.InNamespace(m.in.Namespace))
		if err != nil {
			rep.DrainErr = err
		}
		rep.Acks.Watchers += res.Watchers
		rep.Acks.Acknowledged += res.Acknowledged
		rep.Acks.Gone += res.Gone
		rep.Acks.Unreachable += res.Unreachable
	}
	rep.Acks.Elapsed = time.Since(start)
	if r.cfg.DrainDelay > 0 {
		t := time.NewTimer(r.cfg.DrainDelay)
		select {
		case <-ctx.Done():
		case <-t.C:
		}
		t.Stop()
	}
}

// awaitWorkers waits for the workers, whose context has ended, until due
// (WorkerStopTimeout after their stop); it reports whether they all
// returned.
func (r *runner) awaitWorkers(working *sync.WaitGroup, due time.Time) bool {
	if len(r.cfg.Workers) == 0 {
		return true
	}
	done := make(chan struct{})
	go func() { working.Wait(); close(done) }()
	t := time.NewTimer(time.Until(due))
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		r.log.Warn("lifecycle: workers still running after the worker stop timeout", "timeout", r.cfg.WorkerStopTimeout)
		return false
	}
}

// stopServers stops accepting and lets in-flight requests finish within
// StopTimeout; it reports whether they did.
func (r *runner) stopServers(ctx context.Context) bool {
	clean := true
	var wg sync.WaitGroup
	var mu sync.Mutex
	if r.cfg.GRPC != nil {
		wg.Go(func() {
			ok := beacongrpc.GracefulStop(r.cfg.GRPC, r.cfg.GRPCHealth, r.cfg.StopTimeout)
			mu.Lock()
			clean = clean && ok
			mu.Unlock()
		})
	}
	if r.cfg.HTTP != nil {
		wg.Go(func() {
			sctx, cancel := context.WithTimeout(ctx, r.cfg.StopTimeout)
			defer cancel()
			err := r.cfg.HTTP.Shutdown(sctx)
			if err != nil {
				r.cfg.HTTP.Close()
			}
			mu.Lock()
			clean = clean && err == nil
			mu.Unlock()
		})
	}
	wg.Wait()
	return clean
}

// workerError marks a worker's error among the servers' on their shared
// channel.
type workerError struct{ err error }

func (e *workerError) Error() string { return e.err.Error() }
func (e *workerError) Unwrap() error { return e.err }
