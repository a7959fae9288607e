package proxy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"sigs.k8s.io/yaml"

	"beacon.dev/beacon/registry"
)

// ErrInvalidConfig is matched (errors.Is) by every *FieldError.
var ErrInvalidConfig = errors.New("proxy: invalid config")

// FieldError names the configuration field that is wrong and why, with
// its path in the file: routes[2].split[1].weight.
type FieldError struct {
	Field  string
	Reason string
}

func (e *FieldError) Error() string { return "proxy: config: " + e.Field + ": " + e.Reason }

// Is makes errors.Is(err, ErrInvalidConfig) true.
func (e *FieldError) Is(target error) bool { return target == ErrInvalidConfig }

// Duration is a time.Duration written as a Go duration string ("250ms").
type Duration time.Duration

// UnmarshalJSON reads "1.5s" (or a number of nanoseconds).
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		var n int64
		if err2 := json.Unmarshal(b, &n); err2 != nil {
			return fmt.Errorf("a duration like \"2s\" or \"250ms\", got %s", b)
		}
		*d = Duration(n)
		return nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("a duration like \"2s\" or \"250ms\", got %q", s)
	}
	*d = Duration(v)
	return nil
}

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// Config is the whole proxy configuration: one file, YAML or JSON
// (LoadConfig). Field names in the file are the json tags.
type Config struct {
	Registry  Registry   `json:"registry"`
	Zone      string     `json:"zone,omitempty"` // the proxy's zone, for zone-aware routing
	Listeners []Listener `json:"listeners,omitempty"`
	Routes    []Route    `json:"routes,omitempty"`
	TCP       []TCPRoute `json:"tcp,omitempty"`
	Metrics   Metrics    `json:"metrics,omitempty"`
	AccessLog AccessLog  `json:"accessLog,omitempty"`
	Sidecar   *Sidecar   `json:"sidecar,omitempty"`
}

// Registry is the connection to the beacon servers (client.New).
type Registry struct {
	Servers   []string `json:"servers"`
	Namespace string   `json:"namespace,omitempty"`
	// Token is the ACL token; TokenFile reads it from a file instead.
	Token     string    `json:"token,omitempty"`
	TokenFile string    `json:"tokenFile,omitempty"`
	TLS       ClientTLS `json:"tls,omitempty"`
	// SnapshotDir keeps the discovered services on disk for a cold start
	// while the registry is unreachable.
	SnapshotDir string `json:"snapshotDir,omitempty"`
}

// ClientTLS is TLS to the registry: the CA, and a client certificate
// where the servers require one (mTLS).
type ClientTLS struct {
	CA   string `json:"ca,omitempty"`
	Cert string `json:"cert,omitempty"`
	Key  string `json:"key,omitempty"`
}

// ServerTLS is a listener's certificate; HTTP/2 is negotiated by ALPN.
type ServerTLS struct {
	Cert string `json:"cert"`
	Key  string `json:"key"`
}

// Listener is one HTTP listener; every route applies to every listener.
type Listener struct {
	Name string     `json:"name"`
	Addr string     `json:"addr"`
	TLS  *ServerTLS `json:"tls,omitempty"`
	// H2C accepts HTTP/2 without TLS (prior knowledge) beside HTTP/1.1.
	H2C bool `json:"h2c,omitempty"`
	// NetHTTP serves every request of a plain listener with Go's net/http
	// server and transport, as TLS listeners are, instead of the HTTP/1.1
	// fast path (docs/proxy.md). For comparison, or a client the fast
	// path mishandles.
	NetHTTP bool   `json:"netHTTP,omitempty"`
	Limits  Limits `json:"limits,omitempty"`
}

// Limits bound what one listener accepts. Zero fields take
// DefaultLimits' values; MaxBodyBytes -1 means no bound.
type Limits struct {
	MaxConnections    int      `json:"maxConnections,omitempty"`
	MaxHeaderBytes    int      `json:"maxHeaderBytes,omitempty"`
	MaxBodyBytes      int64    `json:"maxBodyBytes,omitempty"`
	ReadHeaderTimeout Duration `json:"readHeaderTimeout,omitempty"`
	IdleTimeout       Duration `json:"idleTimeout,omitempty"`
	// WriteTimeout bounds a whole response; 0 (the default) leaves
	// streaming responses unbounded and relies on the route's timeout.
	WriteTimeout Duration `json:"writeTimeout,omitempty"`
}

// DefaultLimits are the limits of a listener that sets none.
var DefaultLimits = Limits{
	MaxConnections:    10000,
	MaxHeaderBytes:    1 << 20,
	MaxBodyBytes:      64 << 20,
	ReadHeaderTimeout: Duration(10 * time.Second),
	IdleTimeout:       Duration(2 * time.Minute),
}

// Route sends the requests it matches to a beacon service.
type Route struct {
	Name  string `json:"name"`
	Match Match  `json:"match,omitempty"`
	// Service is the beacon service the route's requests go to.
	Service string `json:"service"`
	// Split divides the traffic between groups of the service's instances
	// (versions, tags, metadata) by weight: a 90/10 canary. Empty: every
	// instance.
	Split []Split `json:"split,omitempty"`
	// StripPrefix removes Match.PathPrefix from the path sent upstream.
	StripPrefix bool `json:"stripPrefix,omitempty"`
	// Timeout bounds the whole request, retries included (default 30s).
	Timeout Duration `json:"timeout,omitempty"`
	// PerTryTimeout bounds each attempt (0: none).
	PerTryTimeout Duration `json:"perTryTimeout,omitempty"`
	Retry         Retry    `json:"retry,omitempty"`
	Hedge         *Hedge   `json:"hedge,omitempty"`
	Breaker       *Breaker `json:"breaker,omitempty"`
	Outlier       Outlier  `json:"outlier,omitempty"`
	// PanicThreshold: below this healthy share, balance over every
	// instance (0 disables).
	PanicThreshold float64 `json:"panicThreshold,omitempty"`
	// UpstreamTLS makes the route speak TLS to its instances (HTTP/2 by
	// ALPN where they offer it), with a client certificate for mTLS.
	UpstreamTLS *UpstreamTLS `json:"upstreamTLS,omitempty"`
}

// UpstreamTLS is TLS from the proxy to a route's instances. The files are
// read when the route is built: a reload picks up rotated certificates.
type UpstreamTLS struct {
	// CA verifies the instances' certificates (PEM; default: the system's
	// roots).
	CA string `json:"ca,omitempty"`
	// Cert and Key are the proxy's client certificate, for instances that
	// require one (mTLS).
	Cert string `json:"cert,omitempty"`
	Key  string `json:"key,omitempty"`
	// ServerName is the name the instances' certificates must carry
	// (default: the route's service name; one certificate serves every
	// instance of a service, whatever its address).
	ServerName string `json:"serverName,omitempty"`
}

// Match selects requests. Every given condition must hold; the routes are
// tried in order and the first match wins.
type Match struct {
	// Host, without a port; "*.example.com" matches any subdomain.
	Host       string `json:"host,omitempty"`
	PathPrefix string `json:"pathPrefix,omitempty"`
	// Headers: each header must have exactly this value.
	Headers map[string]string `json:"headers,omitempty"`
}

// Split is one weighted group of a route's instances.
type Split struct {
	Name     string            `json:"name"`
	Weight   int               `json:"weight"` // 1..100
	Version  string            `json:"version,omitempty"`
	Tags     []string          `json:"tags,omitempty"`
	Metadata map[string]string `json:"metadata,omitempty"`
}

// Retry tunes retries of idempotent requests (GET, HEAD, OPTIONS, PUT,
// DELETE, or with an Idempotency-Key header); others are retried only when
// the connection was refused.
type Retry struct {
	MaxAttempts int `json:"maxAttempts,omitempty"` // including the first; default 3, 1 disables
}

// Hedge sends a second attempt of a GET or HEAD without a body when the
// first has not answered after Delay.
type Hedge struct {
	Delay    Duration `json:"delay"`
	MaxExtra int      `json:"maxExtra,omitempty"` // default 1
}

// Breaker is the route's circuit breaker (policy.BreakerConfig).
type Breaker struct {
	FailureRate float64  `json:"failureRate,omitempty"` // default 0.5
	MinCalls    int      `json:"minCalls,omitempty"`    // default 20
	OpenFor     Duration `json:"openFor,omitempty"`     // default 10s
}

// Outlier tunes ejection of failing instances (outlier.Config).
type Outlier struct {
	ConsecutiveFailures int      `json:"consecutiveFailures,omitempty"` // default 5
	BaseEjection        Duration `json:"baseEjection,omitempty"`        // default 30s
}

// TCPRoute proxies connections (L4) to a service's instances.
type TCPRoute struct {
	Name           string   `json:"name"`
	Addr           string   `json:"addr"`
	Service        string   `json:"service"`
	ConnectTimeout Duration `json:"connectTimeout,omitempty"` // default 5s
	MaxConnections int      `json:"maxConnections,omitempty"` // default 10000
	// IdleTimeout closes a connection on which nothing was read, either
	// way, for this long (nginx's proxy_timeout; default 10m).
	IdleTimeout Duration `json:"idleTimeout,omitempty"`
}

// Metrics serves Prometheus metrics on Addr at /metrics ("" disables).
type Metrics struct {
	Addr string `json:"addr,omitempty"`
}

// AccessLog writes one JSON line per request to Path ("-": standard
// output; "": off).
type AccessLog struct {
	Path string `json:"path,omitempty"`
}

// Sidecar fronts a local service: the proxy registers it with beacon,
// listens on Addr, passes requests to Local, and drains on SIGTERM.
type Sidecar struct {
	Service string `json:"service"`
	ID      string `json:"id,omitempty"`
	// Addr is the inbound listener; Advertise the address registered
	// (default: Addr's host, which must then not be unspecified).
	Addr      string `json:"addr"`
	Advertise string `json:"advertise,omitempty"`
	// Local is the service's own address (host:port).
	Local string `json:"local"`
	// HealthPath is GET on Local until it answers 2xx before registering,
	// and then polled: a failing local service makes the sidecar's /readyz
	// fail (default "/", "-" disables).
	HealthPath     string            `json:"healthPath,omitempty"`
	HealthInterval Duration          `json:"healthInterval,omitempty"` // default 1s
	Version        string            `json:"version,omitempty"`
	Tags           []string          `json:"tags,omitempty"`
	Metadata       map[string]string `json:"metadata,omitempty"`
	Weight         int               `json:"weight,omitempty"`
	TTL            Duration          `json:"ttl,omitempty"`
	AckTimeout     Duration          `json:"ackTimeout,omitempty"`
	StopTimeout    Duration          `json:"stopTimeout,omitempty"`
	DrainDelay     Duration          `json:"drainDelay,omitempty"`
	Limits         Limits            `json:"limits,omitempty"`
}

// Bounds of a configuration.
const (
	MaxRoutes    = 1000
	MaxSplits    = 64
	MaxListeners = 64
	MaxTCPRoutes = 64 // each a listener
	MaxFileBytes = 4 << 20
)

// LoadConfig reads and validates a YAML or JSON file.
func LoadConfig(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("proxy: config: %w", err)
	}
	return ParseConfig(data)
}

// ParseConfig decodes YAML or JSON (JSON is YAML), refusing unknown
// fields, and validates the result.
func ParseConfig(data []byte) (*Config, error) {
	if len(data) > MaxFileBytes {
		return nil, &FieldError{"(file)", fmt.Sprintf("%d bytes, at most %d", len(data), MaxFileBytes)}
	}
	var c Config
	if err := yaml.UnmarshalStrict(data, &c); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidConfig, err)
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

func fe(field, format string, args ...any) error {
	return &FieldError{Field: field, Reason: fmt.Sprintf(format, args...)}
}

// Validate checks every field and fills in defaults; the first error names
// its field.
func (c *Config) Validate() error {
	if len(c.Registry.Servers) == 0 {
		return fe("registry.servers", "at least one beacon server (host:port) is required")
	}
	for i, s := range c.Registry.Servers {
		if _, _, err := net.SplitHostPort(s); err != nil {
			return fe(fmt.Sprintf("registry.servers[%d]", i), "must be host:port, got %q", s)
		}
	}
	if c.Registry.Token != "" && c.Registry.TokenFile != "" {
		return fe("registry.tokenFile", "give token or tokenFile, not both")
	}
	if (c.Registry.TLS.Cert == "") != (c.Registry.TLS.Key == "") {
		return fe("registry.tls.key", "cert and key go together")
	}
	if c.Registry.Namespace != "" {
		if err := registry.ValidateName("namespace", c.Registry.Namespace); err != nil {
			return fe("registry.namespace", "%v", err)
		}
	}
	if len(c.Listeners) == 0 && len(c.TCP) == 0 && c.Sidecar == nil {
		return fe("listeners", "nothing to serve: give listeners, tcp or sidecar")
	}
	if len(c.Listeners) > MaxListeners {
		return fe("listeners", "%d listeners, at most %d", len(c.Listeners), MaxListeners)
	}
	if len(c.Routes) > MaxRoutes {
		return fe("routes", "%d routes, at most %d", len(c.Routes), MaxRoutes)
	}
	if len(c.Listeners) > 0 && len(c.Routes) == 0 {
		return fe("routes", "HTTP listeners need at least one route")
	}
	names := map[string]string{}
	unique := func(field, name string) error {
		if err := registry.ValidateName("name", name); err != nil {
			return fe(field, "must be a DNS-label-like name (a-z, 0-9, '-'), got %q", name)
		}
		if prev, ok := names[name]; ok {
			return fe(field, "%q is also %s", name, prev)
		}
		names[name] = field
		return nil
	}
	addrs := map[string]string{}
	addr := func(field, a string) error {
		if _, _, err := net.SplitHostPort(a); err != nil {
			return fe(field, "must be host:port or :port, got %q", a)
		}
		if prev, ok := addrs[a]; ok {
			return fe(field, "%s is also %s", a, prev)
		}
		addrs[a] = field
		return nil
	}
	for i := range c.Listeners {
		l, p := &c.Listeners[i], fmt.Sprintf("listeners[%d]", i)
		if err := unique(p+".name", l.Name); err != nil {
			return err
		}
		if err := addr(p+".addr", l.Addr); err != nil {
			return err
		}
		if l.TLS != nil && (l.TLS.Cert == "" || l.TLS.Key == "") {
			return fe(p+".tls", "cert and key are both required")
		}
		if err := l.Limits.validate(p + ".limits"); err != nil {
			return err
		}
	}
	for i := range c.Routes {
		if err := c.Routes[i].validate(fmt.Sprintf("routes[%d]", i), unique); err != nil {
			return err
		}
	}
	if len(c.TCP) > MaxTCPRoutes {
		return fe("tcp", "%d routes, at most %d", len(c.TCP), MaxTCPRoutes)
	}
	for i := range c.TCP {
		t, p := &c.TCP[i], fmt.Sprintf("tcp[%d]", i)
		if err := unique(p+".name", t.Name); err != nil {
			return err
		}
		if err := addr(p+".addr", t.Addr); err != nil {
			return err
		}
		if err := registry.ValidateName("service", t.Service); err != nil {
			return fe(p+".service", "must be a service name, got %q", t.Service)
		}
		for _, f := range []struct {
			name string
			v    int64
		}{{"connectTimeout", int64(t.ConnectTimeout)}, {"maxConnections", int64(t.MaxConnections)}, {"idleTimeout", int64(t.IdleTimeout)}} {
			if f.v < 0 {
				return fe(p+"."+f.name, "must not be negative")
			}
		}
		if t.IdleTimeout == 0 {
			t.IdleTimeout = Duration(10 * time.Minute)
		}
		if t.ConnectTimeout == 0 {
			t.ConnectTimeout = Duration(5 * time.Second)
		}
		if t.MaxConnections == 0 {
			t.MaxConnections = 10000
		}
	}
	if c.Metrics.Addr != "" {
		if err := addr("metrics.addr", c.Metrics.Addr); err != nil {
			return err
		}
	}
	if s := c.Sidecar; s != nil {
		if err := s.validate("sidecar", addr); err != nil {
			return err
		}
	}
	return nil
}

func (l *Limits) validate(p string) error {
	d := DefaultLimits
	switch {
	case l.MaxConnections < 0:
		return fe(p+".maxConnections", "must not be negative")
	case l.MaxHeaderBytes < 0 || l.MaxHeaderBytes > 64<<20:
		return fe(p+".maxHeaderBytes", "must be 0..%d", 64<<20)
	case l.MaxBodyBytes < -1:
		return fe(p+".maxBodyBytes", "must be -1 (no bound), 0 (default %d) or positive", d.MaxBodyBytes)
	case l.ReadHeaderTimeout < 0, l.IdleTimeout < 0, l.WriteTimeout < 0:
		return fe(p, "timeouts must not be negative")
	}
	if l.MaxConnections == 0 {
		l.MaxConnections = d.MaxConnections
	}
	if l.MaxHeaderBytes == 0 {
		l.MaxHeaderBytes = d.MaxHeaderBytes
	}
	if l.MaxBodyBytes == 0 {
		l.MaxBodyBytes = d.MaxBodyBytes
	}
	if l.ReadHeaderTimeout == 0 {
		l.ReadHeaderTimeout = d.ReadHeaderTimeout
	}
	if l.IdleTimeout == 0 {
		l.IdleTimeout = d.IdleTimeout
	}
	return nil
}

func (r *Route) validate(p string, unique func(field, name string) error) error {
	if err := unique(p+".name", r.Name); err != nil {
		return err
	}
	if err := registry.ValidateName("service", r.Service); err != nil {
		return fe(p+".service", "must be a beacon service name, got %q", r.Service)
	}
	m := r.Match
	if m.Host != "" && (strings.ContainsAny(m.Host, ":/ ") || strings.Contains(m.Host[min(1, len(m.Host)):], "*")) {
		return fe(p+".match.host", "a host without port; only a leading \"*.\" wildcard, got %q", m.Host)
	}
	if m.PathPrefix != "" && !strings.HasPrefix(m.PathPrefix, "/") {
		return fe(p+".match.pathPrefix", "must start with /, got %q", m.PathPrefix)
	}
	if r.StripPrefix && m.PathPrefix == "" {
		return fe(p+".stripPrefix", "needs match.pathPrefix")
	}
	for h := range m.Headers {
		if h == "" || strings.ContainsAny(h, " :\r\n") {
			return fe(p+".match.headers", "bad header name %q", h)
		}
	}
	if len(r.Split) > MaxSplits {
		return fe(p+".split", "%d groups, at most %d", len(r.Split), MaxSplits)
	}
	splits := map[string]bool{}
	for j, s := range r.Split {
		sp := fmt.Sprintf("%s.split[%d]", p, j)
		if s.Name == "" || splits[s.Name] {
			return fe(sp+".name", "must be set and unique within the route, got %q", s.Name)
		}
		splits[s.Name] = true
		if s.Weight < 1 || s.Weight > 100 {
			return fe(sp+".weight", "must be 1..100, got %d", s.Weight)
		}
		if s.Version == "" && len(s.Tags) == 0 && len(s.Metadata) == 0 {
			return fe(sp, "needs version, tags or metadata to select its instances")
		}
	}
	switch {
	case r.Timeout < 0:
		return fe(p+".timeout", "must not be negative")
	case r.PerTryTimeout < 0:
		return fe(p+".perTryTimeout", "must not be negative")
	case r.Retry.MaxAttempts < 0 || r.Retry.MaxAttempts > 10:
		return fe(p+".retry.maxAttempts", "must be 1..10, got %d", r.Retry.MaxAttempts)
	case !(r.PanicThreshold >= 0 && r.PanicThreshold <= 1):
		return fe(p+".panicThreshold", "must be a fraction in [0, 1], got %v", r.PanicThreshold)
	case r.Outlier.ConsecutiveFailures < -1:
		return fe(p+".outlier.consecutiveFailures", "must be -1 (off) or positive")
	case r.Outlier.BaseEjection < 0:
		return fe(p+".outlier.baseEjection", "must not be negative")
	}
	if u := r.UpstreamTLS; u != nil {
		if (u.Cert == "") != (u.Key == "") {
			return fe(p+".upstreamTLS", "cert and key go together (mTLS), got only one")
		}
		if strings.ContainsAny(u.ServerName, " /:") {
			return fe(p+".upstreamTLS.serverName", "a DNS name, got %q", u.ServerName)
		}
	}
	if r.Timeout == 0 {
		r.Timeout = Duration(30 * time.Second)
	}
	if h := r.Hedge; h != nil {
		if h.Delay <= 0 {
			return fe(p+".hedge.delay", "must be positive")
		}
		if h.MaxExtra < 0 || h.MaxExtra > 10 {
			return fe(p+".hedge.maxExtra", "must be 0..10, got %d", h.MaxExtra)
		}
	}
	if b := r.Breaker; b != nil {
		switch {
		case !(b.FailureRate >= 0 && b.FailureRate <= 1):
			return fe(p+".breaker.failureRate", "must be a fraction in (0, 1], got %v", b.FailureRate)
		case b.MinCalls < 0:
			return fe(p+".breaker.minCalls", "must not be negative")
		case b.OpenFor < 0:
			return fe(p+".breaker.openFor", "must not be negative")
		}
	}
	return nil
}

func (s *Sidecar) validate(p string, addr func(field, a string) error) error {
	if err := registry.ValidateName("service", s.Service); err != nil {
		return fe(p+".service", "must be a beacon service name, got %q", s.Service)
	}
	if err := addr(p+".addr", s.Addr); err != nil {
		return err
	}
	if _, _, err := net.SplitHostPort(s.Local); err != nil {
		return fe(p+".local", "must be host:port of the local service, got %q", s.Local)
	}
	host, _, _ := net.SplitHostPort(s.Addr)
	if s.Advertise == "" {
		if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
			return fe(p+".advertise", "required when addr (%q) has no specific host: the address callers reach", s.Addr)
		}
	}
	if s.HealthPath == "" {
		s.HealthPath = "/"
	}
	if s.HealthPath != "-" && !strings.HasPrefix(s.HealthPath, "/") {
		return fe(p+".healthPath", "must start with / (or be \"-\"), got %q", s.HealthPath)
	}
	if s.HealthInterval < 0 || s.TTL < 0 || s.AckTimeout < 0 || s.StopTimeout < 0 || s.DrainDelay < 0 {
		return fe(p, "durations must not be negative")
	}
	if s.HealthInterval == 0 {
		s.HealthInterval = Duration(time.Second)
	}
	return s.Limits.validate(p + ".limits")
}

// routesOnly reports whether b differs from c only in its routes: the part
// Reload applies. Listeners, the registry and the sidecar need a restart.
func (c *Config) sameExceptRoutes(b *Config) (string, bool) {
	x, y := *c, *b
	x.Routes, y.Routes = nil, nil
	for _, f := range []struct {
		name string
		a, b any
	}{
		{"registry", x.Registry, y.Registry}, {"zone", x.Zone, y.Zone}, {"listeners", x.Listeners, y.Listeners},
		{"tcp", x.TCP, y.TCP}, {"metrics", x.Metrics, y.Metrics}, {"accessLog", x.AccessLog, y.AccessLog},
		{"sidecar", x.Sidecar, y.Sidecar},
	} {
		ja, _ := json.Marshal(f.a)
		jb, _ := json.Marshal(f.b)
		if !bytes.Equal(ja, jb) {
			return f.name, false
		}
	}
	return "", true
}
