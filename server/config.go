package server

import (
	"errors"
	"fmt"
	"go.opentelemetry.io/otel/trace"
	"log/slog"
	"math"
	"net"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"beacon.dev/beacon/internal/store"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/internal/health"
	"beacon.dev/beacon/server/internal/kv"
	"beacon.dev/beacon/server/internal/view"
)

// GuardConfig shapes the mass-expiry guard: when more than Share of a
// namespace's instances (and at least MinSessions sessions) expire within
// Window, the server keeps them listed as suspects for Grace.
type GuardConfig = view.GuardConfig

// Defaults for a single machine.
const (
	DefaultAddr    = "127.0.0.1:8970"
	DefaultDataDir = "beacon.data"
	// The embedded etcd's peer address follows --addr (its port + 2)
	// unless set: etcd's own 2380 would collide with the etcd an etcd
	// user already runs. This is the value for DefaultAddr. (Port + 1 was
	// the client port, which is now a unix socket unless asked for:
	// EtcdSocketName.)
	DefaultEtcdPeerAddr = "127.0.0.1:8972"
	// EtcdSocketName is the embedded etcd's client socket in the data
	// directory; the server's own etcd client connects through it.
	EtcdSocketName = "etcd.sock"
)

// maxSocketPath is the longest path a unix socket may have here (the
// kernel's sun_path less the terminating NUL: 107 bytes on Linux, 103 on
// the BSDs and macOS).
var maxSocketPath = len(syscall.RawSockaddrUnix{}.Path) - 1

// EtcdSocket returns the absolute path of the embedded etcd's client
// socket in dataDir, or an error when that path is longer than a unix
// socket's may be.
func EtcdSocket(dataDir string) (string, error) {
	dir, err := filepath.Abs(dataDir)
	if err != nil {
		return "", fmt.Errorf("server: invalid --data-dir %q: %w", dataDir, err)
	}
	path := filepath.Join(dir, EtcdSocketName)
	if len(path) > maxSocketPath {
		return "", fmt.Errorf("server: invalid --data-dir %s: the embedded etcd's socket %s would be %d bytes long, and a unix socket's path may have at most %d: choose a shorter --data-dir", dataDir, path, len(path), maxSocketPath)
	}
	return path, nil
}

// Config configures a Server. Get one from NewConfig.
type Config struct {
	// Addr is where the API, health endpoints and metrics listen.
	Addr string
	// DataDir holds the embedded etcd's data and its client socket
	// (EtcdSocket); Start makes it 0700.
	DataDir string
	// Name names this server (and its etcd member).
	Name string
	// EtcdEndpoints, when set, uses that etcd cluster and embeds none.
	EtcdEndpoints []string
	// EtcdClientAddr, when set, gives the embedded etcd a TCP client
	// listener there, for etcdctl, `beacon operator` and other beacon
	// servers (--etcd-endpoints). Empty: none — the embedded etcd's
	// clients connect through the unix socket EtcdSocket(DataDir) only,
	// as the server itself always does.
	EtcdClientAddr string
	// EtcdClientCertFile and EtcdClientKeyFile serve EtcdClientAddr over
	// TLS, and EtcdClientCAFile admits only clients presenting a
	// certificate of that CA (etcd's client-cert auth). All three or none;
	// without them a listener beyond loopback needs Insecure.
	EtcdClientCertFile, EtcdClientKeyFile, EtcdClientCAFile string
	// EtcdPeerAddr is the embedded etcd's peer listener in cluster mode
	// and its advertised peer URL. A single node listens on no peer port.
	// Empty: Addr's host with its port + 2 (Start fills it in).
	EtcdPeerAddr string
	// EtcdInitialCluster, for a cluster of beacon servers each embedding an
	// etcd member: "name=https://peer-host:port,…" over every member
	// (this one included, under Name and EtcdPeerAddr; http:// with
	// Insecure and no peer TLS). Empty: a single node.
	EtcdInitialCluster string
	// EtcdPeerCertFile, EtcdPeerKeyFile and EtcdPeerCAFile are the peer
	// TLS of cluster mode: the member's certificate, used as both server
	// and client (so for both uses, naming its host), and the CA every
	// member's certificate must chain to. Cluster mode needs them, or
	// Insecure.
	EtcdPeerCertFile, EtcdPeerKeyFile, EtcdPeerCAFile string
	// EtcdCAFile, EtcdCertFile and EtcdKeyFile are how the server talks to
	// an external etcd (EtcdEndpoints) over TLS: the CA to trust (empty:
	// the system's), and a client certificate to present.
	EtcdCAFile, EtcdCertFile, EtcdKeyFile string
	// EtcdClusterToken tells clusters apart (default "beacon").
	EtcdClusterToken string
	// EtcdPrefix is where beacon keeps its keys.
	EtcdPrefix string
	// EtcdUnsafeNoFsync skips fsync in the embedded etcd. Only for tests
	// and benchmarks that do not care about surviving a power cut.
	EtcdUnsafeNoFsync bool
	// EtcdQuotaBackendBytes is the embedded etcd's backend quota, at which
	// it raises the NOSPACE alarm and refuses writes (default 2 GiB). With
	// --etcd-endpoints it stands in for the quota of an etcd older than
	// 3.6, which does not report it.
	EtcdQuotaBackendBytes int64
	// EtcdCompactionRetention is how many revisions of history the server
	// keeps by compacting etcd (default 10000; 0: never compact, only with
	// --etcd-endpoints). See server/space.go.
	EtcdCompactionRetention int64
	// EtcdSpaceCheckInterval is how often the server reads etcd's sizes
	// and alarms and compacts (default 5s).
	EtcdSpaceCheckInterval time.Duration
	// EtcdAutoRecover lets the server recover from the NOSPACE alarm by
	// itself once the data fits: compact, defragment, disarm.
	EtcdAutoRecover bool
	// EtcdDefragInterval is the least time between two automatic
	// defragmentations (default 5m).
	EtcdDefragInterval time.Duration
	// MemberTTL is how long a dead server keeps its share of the health
	// checks before the others take it over (default 3s).
	MemberTTL time.Duration
	// CheckConcurrency bounds the health probes in flight (default 256).
	CheckConcurrency int
	// LockDelay is how long a lock lost with its holder's session (not
	// released) stays free before the next holder gets it (default 5s;
	// negative: none).
	LockDelay time.Duration
	// KVHistory is how many versions of each KV key are kept (default
	// 100; a deletion counts as one).
	KVHistory int
	// CheckMaxConns caps the health probes' connections, open or being
	// dialed, so that probes cannot exhaust the file descriptors (default
	// 1024). A probe that finds them at the limit gets no verdict.
	CheckMaxConns int
	// TLSCertFile and TLSKeyFile serve the API port over TLS (HTTP/2 and
	// HTTP/1.1); TLSClientCAFile then requires client certificates that
	// chain to it (mTLS). The files are read again when they change.
	TLSCertFile, TLSKeyFile, TLSClientCAFile string
	// Insecure allows what is otherwise refused for being open to the
	// network: the API in the clear or without ACLs on an address other
	// than loopback, the
	// embedded etcd's TCP client listener in the clear beyond loopback,
	// and cluster mode without peer TLS. The server warns about each at
	// every start.
	Insecure bool
	// ACL turns on access control: every call is authorized by its token
	// (the anonymous token's policy when it has none), and what no rule
	// grants is denied. `beacon acl bootstrap` makes the first management
	// token (docs/security.md).
	ACL bool
	// ACLBreakGlassFile is where the server writes, at every start, a
	// one-time key that makes a new management token when presented to
	// Bootstrap (default: acl-break-glass.key in DataDir). Readable only by
	// the server's user: whoever can read it can read etcd's data anyway.
	ACLBreakGlassFile string
	// AuditLog, when set, is the file the audit log is written to (JSON
	// lines, hash-chained; server/audit), rotated at AuditLogMaxBytes
	// keeping AuditLogMaxFiles old files.
	// TracerProvider, when set, traces every API request (a server span
	// per call, named by its procedure, joined to the caller's trace by
	// W3C trace context). cmd/beacon sets it from --otlp-endpoint.
	TracerProvider   trace.TracerProvider
	AuditLog         string
	AuditLogMaxBytes int64
	AuditLogMaxFiles int
	// CheckAllowTargets are the CIDRs, addresses and host names checks may
	// probe besides each instance's own address; link-local and metadata
	// addresses are refused whatever it says (docs/health.md, "Where
	// checks may probe").
	CheckAllowTargets []string
	// Guard is the mass-expiry guard; zero fields take the defaults, a
	// negative Share turns it off.
	Guard GuardConfig
	// ProtectionThreshold is the default protection threshold of services
	// that set none (0: off); see registry.Snapshot.Available.
	ProtectionThreshold float64
	// ShutdownTimeout bounds how long Close waits for in-flight calls.
	ShutdownTimeout time.Duration
	// Limits bound what clients can make the server hold or do.
	Limits Limits
	// DNS is the DNS interface (dns.go); off unless DNS.Addr is set.
	DNS DNSConfig
	// Consul configures the Consul-compatible HTTP API (consul.go).
	Consul ConsulConfig
	// ConsoleAddr is where the web console listens (docs/console.md): an
	// address, ConsoleAuto (--addr's port + 3, skipped when taken), or ""
	// for none. `beacon server` defaults to ConsoleAuto.
	ConsoleAddr string
	// XDS configures the xDS control plane (xds.go).
	XDS XDSConfig
	// Logger receives the server's logs; nil discards them.
	Logger *slog.Logger
}

// NewConfig returns the defaults: embedded etcd, data in ./beacon.data,
// API on 127.0.0.1:8970.
func NewConfig() *Config {
	return &Config{
		Addr:            DefaultAddr,
		DataDir:         DefaultDataDir,
		Name:            "beacon",
		EtcdPrefix:      store.DefaultPrefix,
		ShutdownTimeout: 5 * time.Second,
		Limits:          DefaultLimits,
		Consul: ConsulConfig{Datacenter: DefaultConsulDatacenter, MaxWait: DefaultConsulMaxWait,
			MaxBlocking: DefaultConsulMaxBlocking},
		XDS: XDSConfig{MaxStreams: DefaultXDSMaxStreams},

		EtcdQuotaBackendBytes:   DefaultEtcdQuotaBackendBytes,
		EtcdCompactionRetention: DefaultEtcdCompactionRetention,
		EtcdSpaceCheckInterval:  DefaultEtcdSpaceCheckInterval,
		EtcdAutoRecover:         true,
		EtcdDefragInterval:      DefaultEtcdDefragInterval,
	}
}

// Embedded reports whether the server runs its own etcd.
func (c *Config) Embedded() bool { return len(c.EtcdEndpoints) == 0 }

// cluster reports whether the server embeds a member of a cluster of
// several (EtcdInitialCluster is set).
func (c *Config) cluster() bool { return c.EtcdInitialCluster != "" }

// etcdPeerAddr returns the embedded etcd's peer address: the configured
// one, or Addr's port + 2 on its host.
func (c *Config) etcdPeerAddr() (string, error) {
	if c.EtcdPeerAddr != "" {
		return c.EtcdPeerAddr, nil
	}
	host, portText, err := net.SplitHostPort(c.Addr)
	if err != nil {
		return "", fmt.Errorf("server: invalid --addr %q: %w", c.Addr, err)
	}
	port, err := strconv.Atoi(portText)
	if err != nil || port == 0 || port > 65533 {
		return "", fmt.Errorf("server: --addr %s leaves no port + 2 for the embedded etcd's peers: set --etcd-peer-addr", c.Addr)
	}
	return net.JoinHostPort(host, strconv.Itoa(port+2)), nil
}

// peerScheme is the scheme of the embedded etcd's peer URLs.
func (c *Config) peerScheme() string {
	if c.EtcdPeerCertFile != "" {
		return "https"
	}
	return "http"
}

// Validate checks the configuration and names the first bad field.
func (c *Config) Validate() error {
	if err := c.Consul.validate(); err != nil {
		return err
	}
	if err := c.validateXDS(); err != nil {
		return err
	}
	if _, _, err := net.SplitHostPort(c.Addr); err != nil {
		return fmt.Errorf("server: invalid --addr %q: %w", c.Addr, err)
	}
	if err := c.validateConsole(); err != nil {
		return err
	}
	if c.Embedded() {
		peer, err := c.etcdPeerAddr()
		if err != nil {
			return err
		}
		checked := *c // with the address Start will use
		checked.EtcdPeerAddr = peer
		return checked.validate()
	}
	return c.validate()
}

func (c *Config) validate() error {
	if c.Name == "" {
		return errors.New("server: invalid --name: must not be empty")
	}
	if c.EtcdPrefix == "" || c.EtcdPrefix[len(c.EtcdPrefix)-1] != '/' {
		return fmt.Errorf("server: invalid --etcd-prefix %q: must end with '/'", c.EtcdPrefix)
	}
	if c.ShutdownTimeout <= 0 {
		return fmt.Errorf("server: invalid --shutdown-timeout %s: must be positive", c.ShutdownTimeout)
	}
	if c.MemberTTL < 0 || c.MemberTTL > 0 && (c.MemberTTL < time.Second || c.MemberTTL > time.Minute) {
		return fmt.Errorf("server: invalid --member-ttl %s: must be between 1s and 1m (0: the default, 3s)", c.MemberTTL)
	}
	if err := registry.ValidateProtectionThreshold(c.ProtectionThreshold); err != nil {
		return fmt.Errorf("server: invalid --protection-threshold %v: must be between 0 (off) and 1", c.ProtectionThreshold)
	}
	if math.IsNaN(c.Guard.Share) || c.Guard.Share > 1 || c.Guard.MinSessions < 0 || c.Guard.Window < 0 || c.Guard.Grace < 0 || c.Guard.Grace > time.Hour {
		return fmt.Errorf("server: invalid --guard-*: share a number at most 1, sessions, window and grace not negative, grace at most 1h (got %+v)", c.Guard)
	}
	if c.LockDelay > time.Minute {
		return fmt.Errorf("server: invalid --lock-delay %v: at most 1m (0: the default, 5s; negative: none)", c.LockDelay)
	}
	if c.KVHistory < 0 || c.KVHistory > kv.MaxHistory {
		return fmt.Errorf("server: invalid --kv-history %d: must be between 1 and %d (0: the default, %d)", c.KVHistory, kv.MaxHistory, kv.DefaultHistory)
	}
	if c.CheckConcurrency < 0 || c.CheckConcurrency > 100000 {
		return fmt.Errorf("server: invalid --check-concurrency %d: must be between 1 and 100000 (0: the default, 256)", c.CheckConcurrency)
	}
	if c.CheckMaxConns < 0 || c.CheckMaxConns > 1000000 {
		return fmt.Errorf("server: invalid --check-max-conns %d: must be between 1 and 1000000 (0: the default, 1024)", c.CheckMaxConns)
	}
	if !c.Insecure && !loopback(c.Addr) {
		switch {
		case c.TLSCertFile == "" && !c.ACL:
			return fmt.Errorf("server: --addr %s is reachable beyond this machine: serve it with --tls-cert and --tls-key and turn on --acl, or give --insecure to serve in the clear and open (docs/security.md)", c.Addr)
		case c.TLSCertFile == "":
			return fmt.Errorf("server: --addr %s is reachable beyond this machine: serve it with --tls-cert and --tls-key (tokens would cross the network in the clear), or give --insecure (docs/security.md)", c.Addr)
		case !c.ACL:
			return fmt.Errorf("server: --addr %s is reachable beyond this machine: turn on --acl (anyone who reaches it could change the registry), or give --insecure (docs/security.md)", c.Addr)
		}
	}
	if c.Consul.Addr != "" && !c.Insecure && !loopback(c.Consul.Addr) && (c.TLSCertFile == "" || !c.ACL) {
		return fmt.Errorf("server: --consul-addr %s is reachable beyond this machine: serve it with --tls-cert and --tls-key (it uses the API's) and turn on --acl, or give --insecure (docs/security.md)", c.Consul.Addr)
	}
	if (c.TLSCertFile == "") != (c.TLSKeyFile == "") {
		return errors.New("server: invalid --tls-cert / --tls-key: give both or neither")
	}
	if c.TLSClientCAFile != "" && c.TLSCertFile == "" {
		return errors.New("server: invalid --tls-client-ca: client certificates need TLS: give --tls-cert and --tls-key too")
	}
	if c.AuditLogMaxBytes < 0 || c.AuditLogMaxBytes > 0 && c.AuditLogMaxBytes < 4096 || c.AuditLogMaxFiles < 0 || c.AuditLogMaxFiles > 10000 {
		return fmt.Errorf("server: invalid --audit-log-max-bytes %d / --audit-log-max-files %d: at least 4096 bytes, 0 to 10000 files (0: the defaults)", c.AuditLogMaxBytes, c.AuditLogMaxFiles)
	}
	if _, err := health.ParseTargets(c.CheckAllowTargets); err != nil {
		return fmt.Errorf("server: %w", err)
	}
	if err := c.Limits.validate(); err != nil {
		return err
	}
	if err := c.DNS.validate(c.ACL, c.Insecure); err != nil {
		return err
	}
	if err := c.validateSpace(); err != nil {
		return err
	}
	if c.Embedded() {
		return c.validateEmbedded()
	}
	return c.validateExternal()
}

// validateEmbedded checks the embedded etcd's socket, listeners and peer
// TLS (docs/security.md, "The embedded etcd").
func (c *Config) validateEmbedded() error {
	if c.DataDir == "" {
		return errors.New("server: invalid --data-dir: must not be empty with embedded etcd")
	}
	if _, err := EtcdSocket(c.DataDir); err != nil {
		return err
	}
	if c.EtcdCAFile != "" || c.EtcdCertFile != "" || c.EtcdKeyFile != "" {
		return errors.New("server: invalid --etcd-cacert / --etcd-cert / --etcd-key: only with --etcd-endpoints (the server reaches its embedded etcd through its socket)")
	}
	if _, _, err := net.SplitHostPort(c.EtcdPeerAddr); err != nil {
		return fmt.Errorf("server: invalid --etcd-peer-addr %q: %w", c.EtcdPeerAddr, err)
	}
	clientTLS := c.EtcdClientCertFile != "" || c.EtcdClientKeyFile != "" || c.EtcdClientCAFile != ""
	if clientTLS && (c.EtcdClientCertFile == "" || c.EtcdClientKeyFile == "" || c.EtcdClientCAFile == "") {
		return errors.New("server: invalid --etcd-client-cert / --etcd-client-key / --etcd-client-ca: give all three (TLS that admits only clients with a certificate of the CA) or none")
	}
	if c.EtcdClientAddr == "" {
		if clientTLS {
			return errors.New("server: invalid --etcd-client-cert: the embedded etcd has no TCP client listener to serve with it: set --etcd-client-addr")
		}
	} else {
		if _, _, err := net.SplitHostPort(c.EtcdClientAddr); err != nil {
			return fmt.Errorf("server: invalid --etcd-client-addr %q: %w", c.EtcdClientAddr, err)
		}
		if !clientTLS && !c.Insecure && !loopback(c.EtcdClientAddr) {
			return fmt.Errorf("server: --etcd-client-addr %s is reachable beyond this machine, and whoever reaches it can write the registry past the server: protect it with --etcd-client-cert, --etcd-client-key and --etcd-client-ca, or give --insecure (docs/security.md)", c.EtcdClientAddr)
		}
	}
	peerTLS := c.EtcdPeerCertFile != "" || c.EtcdPeerKeyFile != "" || c.EtcdPeerCAFile != ""
	if peerTLS && (c.EtcdPeerCertFile == "" || c.EtcdPeerKeyFile == "" || c.EtcdPeerCAFile == "") {
		return errors.New("server: invalid --etcd-peer-cert / --etcd-peer-key / --etcd-peer-ca: give all three or none")
	}
	if !c.cluster() {
		if peerTLS {
			return errors.New("server: invalid --etcd-peer-cert: a single node has no peers: only with --etcd-initial-cluster")
		}
		return nil
	}
	if !peerTLS && !c.Insecure {
		return errors.New("server: --etcd-initial-cluster without peer TLS: whoever reaches a peer port can join the cluster or forge its traffic: give --etcd-peer-cert, --etcd-peer-key and --etcd-peer-ca, or --insecure to let the members talk in the clear (docs/security.md)")
	}
	scheme := c.peerScheme()
	found := false
	for _, m := range strings.Split(c.EtcdInitialCluster, ",") {
		name, peer, ok := strings.Cut(strings.TrimSpace(m), "=")
		u, err := url.Parse(peer)
		if !ok || name == "" || err != nil || u.Host == "" || u.Scheme != scheme {
			return fmt.Errorf("server: invalid --etcd-initial-cluster %q: each member must be name=%s://host:port (%s)", c.EtcdInitialCluster, scheme, map[string]string{"https": "peer TLS", "http": "no peer TLS"}[scheme])
		}
		found = found || name == c.Name && u.Host == c.EtcdPeerAddr
	}
	if !found {
		return fmt.Errorf("server: invalid --etcd-initial-cluster: must list this server as %s=%s://%s", c.Name, scheme, c.EtcdPeerAddr)
	}
	return nil
}

// validateExternal checks the flags of an external etcd.
func (c *Config) validateExternal() error {
	if c.cluster() {
		return errors.New("server: invalid --etcd-initial-cluster: not with --etcd-endpoints (that cluster is someone else's)")
	}
	for flag, v := range map[string]string{
		"--etcd-client-addr": c.EtcdClientAddr, "--etcd-client-cert": c.EtcdClientCertFile, "--etcd-client-key": c.EtcdClientKeyFile, "--etcd-client-ca": c.EtcdClientCAFile,
		"--etcd-peer-cert": c.EtcdPeerCertFile, "--etcd-peer-key": c.EtcdPeerKeyFile, "--etcd-peer-ca": c.EtcdPeerCAFile,
	} {
		if v != "" {
			return fmt.Errorf("server: invalid %s: it configures the embedded etcd, and --etcd-endpoints embeds none", flag)
		}
	}
	if (c.EtcdCertFile == "") != (c.EtcdKeyFile == "") {
		return errors.New("server: invalid --etcd-cert / --etcd-key: give both or neither")
	}
	if c.EtcdCAFile != "" || c.EtcdCertFile != "" {
		for _, ep := range c.EtcdEndpoints {
			if strings.HasPrefix(ep, "http://") {
				return fmt.Errorf("server: invalid --etcd-endpoints %s: with --etcd-cacert or --etcd-cert, use https:// (etcd's client would talk to http:// in the clear)", ep)
			}
		}
	}
	return nil
}

// BindFlags binds the configuration to command-line flags.
func (c *Config) BindFlags(fs *pflag.FlagSet) {
	fs.StringVar(&c.Addr, "addr", c.Addr, "address for the API (gRPC and HTTP/JSON), health endpoints and metrics")
	fs.StringVar(&c.DataDir, "data-dir", c.DataDir, "directory of the embedded etcd's data")
	fs.StringVar(&c.Name, "name", c.Name, "name of this server and its etcd member")
	fs.StringSliceVar(&c.EtcdEndpoints, "etcd-endpoints", c.EtcdEndpoints, "use this etcd cluster (comma-separated URLs) instead of an embedded etcd")
	fs.StringVar(&c.EtcdClientAddr, "etcd-client-addr", c.EtcdClientAddr, "embedded etcd: also a TCP client listener here, for etcdctl, 'beacon operator' and other servers (default: none; the socket <data-dir>/"+EtcdSocketName+" only)")
	fs.StringVar(&c.EtcdClientCertFile, "etcd-client-cert", c.EtcdClientCertFile, "embedded etcd: serve --etcd-client-addr over TLS with this certificate (PEM)")
	fs.StringVar(&c.EtcdClientKeyFile, "etcd-client-key", c.EtcdClientKeyFile, "the --etcd-client-cert's private key (PEM)")
	fs.StringVar(&c.EtcdClientCAFile, "etcd-client-ca", c.EtcdClientCAFile, "embedded etcd: admit on --etcd-client-addr only clients with a certificate of these CAs (PEM)")
	fs.StringVar(&c.EtcdPeerAddr, "etcd-peer-addr", c.EtcdPeerAddr, "embedded etcd: peer listener in cluster mode, and the peer URL a single node advertises (default: --addr's host, its port + 2: "+DefaultEtcdPeerAddr+")")
	fs.StringVar(&c.EtcdInitialCluster, "etcd-initial-cluster", c.EtcdInitialCluster, "embedded etcd cluster: name=https://peer-addr,... over every member, this one included (http:// with --insecure; empty: single node)")
	fs.StringVar(&c.EtcdPeerCertFile, "etcd-peer-cert", c.EtcdPeerCertFile, "embedded etcd cluster: this member's certificate for its peers, as server and as client (PEM)")
	fs.StringVar(&c.EtcdPeerKeyFile, "etcd-peer-key", c.EtcdPeerKeyFile, "the --etcd-peer-cert's private key (PEM)")
	fs.StringVar(&c.EtcdPeerCAFile, "etcd-peer-ca", c.EtcdPeerCAFile, "embedded etcd cluster: the CAs every member's certificate must chain to (PEM)")
	fs.StringVar(&c.EtcdCAFile, "etcd-cacert", c.EtcdCAFile, "external etcd: trust these CAs for --etcd-endpoints (PEM; default: the system's)")
	fs.StringVar(&c.EtcdCertFile, "etcd-cert", c.EtcdCertFile, "external etcd: present this client certificate to --etcd-endpoints (PEM)")
	fs.StringVar(&c.EtcdKeyFile, "etcd-key", c.EtcdKeyFile, "the --etcd-cert's private key (PEM)")
	fs.StringVar(&c.EtcdClusterToken, "etcd-cluster-token", c.EtcdClusterToken, "embedded etcd cluster: token telling clusters apart (default beacon)")
	fs.StringVar(&c.EtcdPrefix, "etcd-prefix", c.EtcdPrefix, "key prefix of beacon's records in etcd")
	c.bindSpaceFlags(fs)
	fs.BoolVar(&c.EtcdUnsafeNoFsync, "etcd-unsafe-no-fsync", c.EtcdUnsafeNoFsync, "embedded etcd: skip fsync (tests and benchmarks only: loses data on power loss)")
	fs.DurationVar(&c.ShutdownTimeout, "shutdown-timeout", c.ShutdownTimeout, "how long shutdown waits for in-flight calls")
	fs.DurationVar(&c.MemberTTL, "member-ttl", c.MemberTTL, "how long a dead server's health checks wait before the other servers take them over (default 3s)")
	fs.DurationVar(&c.LockDelay, "lock-delay", c.LockDelay, "how long a lock lost with its holder's session stays free before the next holder gets it, so the lost holder's writes in flight land first (0: the default, 5s; negative: none)")
	fs.IntVar(&c.KVHistory, "kv-history", c.KVHistory, "versions kept of each KV key, its deletion included (0: the default, 100)")
	fs.IntVar(&c.CheckConcurrency, "check-concurrency", c.CheckConcurrency, "health probes in flight at most (default 256)")
	fs.BoolVar(&c.Insecure, "insecure", c.Insecure, "allow what is open to the network: the API on a non-loopback --addr in the clear or without --acl, the embedded etcd's --etcd-client-addr without TLS, cluster members without peer TLS (without it each is refused; with it each is warned about at every start)")
	fs.BoolVar(&c.ACL, "acl", c.ACL, "access control: every call needs a token allowed to make it (default deny; 'beacon acl bootstrap' makes the first management token)")
	fs.StringVar(&c.ACLBreakGlassFile, "acl-break-glass-file", c.ACLBreakGlassFile, "where the server writes its one-time break-glass key for 'beacon acl bootstrap --break-glass' (default: acl-break-glass.key in --data-dir)")
	fs.StringVar(&c.AuditLog, "audit-log", c.AuditLog, "write every write call and every refused call to this file (JSON lines chained by SHA-256; check it with 'beacon audit verify')")
	fs.Int64Var(&c.AuditLogMaxBytes, "audit-log-max-bytes", c.AuditLogMaxBytes, "rotate the audit log at this size (default 64 MiB)")
	fs.IntVar(&c.AuditLogMaxFiles, "audit-log-max-files", c.AuditLogMaxFiles, "rotated audit log files kept (default 10)")
	fs.StringVar(&c.TLSCertFile, "tls-cert", c.TLSCertFile, "serve the API over TLS with this certificate (PEM; read again when it changes)")
	fs.StringVar(&c.TLSKeyFile, "tls-key", c.TLSKeyFile, "the --tls-cert's private key (PEM)")
	fs.StringVar(&c.TLSClientCAFile, "tls-client-ca", c.TLSClientCAFile, "require client certificates signed by these CAs (PEM; mTLS)")
	fs.StringSliceVar(&c.CheckAllowTargets, "check-allow-targets", c.CheckAllowTargets, "CIDRs, addresses or host names health checks may probe besides each instance's own address (comma-separated; link-local and metadata addresses are refused always)")
	fs.IntVar(&c.CheckMaxConns, "check-max-conns", c.CheckMaxConns, "health probe connections, open or being dialed, at most (default 1024)")
	fs.Float64Var(&c.Guard.Share, "guard-share", c.Guard.Share, "mass-expiry guard: share of a namespace's instances whose sessions expire within --guard-window that makes the server hold them as suspects (default 0.3; negative: off)")
	fs.IntVar(&c.Guard.MinSessions, "guard-min-sessions", c.Guard.MinSessions, "mass-expiry guard: sessions that must expire together (default 3)")
	fs.DurationVar(&c.Guard.Window, "guard-window", c.Guard.Window, "mass-expiry guard: how close together the expiries are (default 10s)")
	fs.DurationVar(&c.Guard.Grace, "guard-grace", c.Guard.Grace, "mass-expiry guard: how long held instances stay (default 1m)")
	c.Limits.bindFlags(fs)
	c.DNS.bindFlags(fs)
	c.Consul.bindFlags(fs)
	fs.StringVar(&c.ConsoleAddr, "console-addr", c.ConsoleAddr, "web console address (same TLS as --addr); \"auto\": --addr's host, its port + 3 ("+DefaultConsoleAddr+" by default), left off when that port is taken; \"off\": none")
	c.XDS.bindFlags(fs)
	fs.Float64Var(&c.ProtectionThreshold, "protection-threshold", c.ProtectionThreshold, "default protection threshold in [0, 1]: below this share of routable instances, discovery returns unhealthy ones too (0: off)")
}

// loopback reports whether addr's host is this machine only.
func loopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
