package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.etcd.io/etcd/server/v3/etcdserver"
	"go.etcd.io/etcd/server/v3/lease"
	"go.uber.org/zap"

	"beacon.dev/beacon/internal/store"
)

// startEmbeddedEtcd starts the embedded etcd member and waits until it
// serves. Its clients connect through the unix socket at socket, which
// only this user may enter (lockDataDir made the data directory 0700;
// the socket is made 0600 here), so no other local process can write the
// registry past the server; a TCP client listener exists only when
// EtcdClientAddr asks for one. A single node listens on no peer port: a
// process that reaches an etcd member's peer port can forge raft traffic,
// which writes whatever it likes. In cluster mode the peers talk TLS and
// must present a certificate of EtcdPeerCAFile (or, with Insecure, talk
// in the clear). lastWarning returns etcd's last warning, to say why it
// is not ready.
func startEmbeddedEtcd(ctx context.Context, c *Config, socket string, lg *zap.Logger, lastWarning func() string) (*embed.Etcd, error) {
	ec := embeddedEtcdConfig(c, socket)
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(lg)
	walProblem := checkEtcdLog(ec.Dir)
	if walProblem != nil {
		lg.Error("embedded etcd's data is damaged", zap.Error(walProblem))
	}
	e, err := embed.StartEtcd(ec)
	if err != nil {
		// A port clash names the flag that chose the port.
		for flag, addr := range map[string]string{"--etcd-client-addr": c.EtcdClientAddr, "--etcd-peer-addr": c.EtcdPeerAddr} {
			if addr != "" && strings.Contains(err.Error(), addr) {
				return nil, fmt.Errorf("server: embedded etcd: %s %s: %w (another etcd, or another beacon server, listens there: pick another %s, or another --addr)", flag, addr, err, flag)
			}
		}
		return nil, fmt.Errorf("server: starting embedded etcd in %s: %w", ec.Dir, err)
	}
	// The data directory already keeps others out; the socket's own mode
	// says so too, for anyone who looks (and for a directory opened later).
	if err := os.Chmod(socket, 0o600); err != nil {
		closeUnreadyEtcd(e)
		return nil, fmt.Errorf("server: embedded etcd: restricting its socket %s to this user: %w", socket, err)
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, nil
	case err := <-e.Err():
		closeUnreadyEtcd(e)
		return nil, fmt.Errorf("server: embedded etcd failed: %w", err)
	case <-ctx.Done():
		closeUnreadyEtcd(e)
		return nil, ctx.Err()
	case <-time.After(60 * time.Second):
		why := "its last warning: " + lastWarning() // before closing adds its own
		switch {
		case walProblem != nil:
			why = walProblem.Error()
		case why == "its last warning: ":
			why = "it logged no warning"
		}
		closeUnreadyEtcd(e)
		return nil, fmt.Errorf("server: embedded etcd in %s not ready after 60s; %s", ec.Dir, why)
	}
}

// embeddedEtcdConfig is the configuration startEmbeddedEtcd starts etcd
// with.
func embeddedEtcdConfig(c *Config, socket string) *embed.Config {
	ec := embed.NewConfig()
	ec.Name = c.Name
	ec.Dir = filepath.Join(c.DataDir, "etcd")
	su := url.URL{Scheme: "unix", Path: socket}
	ec.ListenClientUrls, ec.AdvertiseClientUrls = []url.URL{su}, []url.URL{su}
	if c.EtcdClientAddr != "" {
		cu := url.URL{Scheme: "http", Host: c.EtcdClientAddr}
		if c.EtcdClientCertFile != "" {
			cu.Scheme = "https"
			ec.ClientTLSInfo = transport.TLSInfo{
				CertFile: c.EtcdClientCertFile, KeyFile: c.EtcdClientKeyFile,
				TrustedCAFile: c.EtcdClientCAFile, ClientCertAuth: true,
			}
		}
		// Members advertise the TCP listener: it is the one others can use.
		ec.ListenClientUrls = append(ec.ListenClientUrls, cu)
		ec.AdvertiseClientUrls = []url.URL{cu}
	}
	// Nothing of beacon's uses etcd's JSON gateway; it would only be one
	// more way in, and with client-cert auth it cannot dial its own
	// listener anyway.
	ec.EnableGRPCGateway = false
	pu := url.URL{Scheme: c.peerScheme(), Host: c.EtcdPeerAddr}
	ec.AdvertisePeerUrls = []url.URL{pu}
	ec.ListenPeerUrls = nil // a single node has no peers to listen for
	ec.InitialCluster = ec.InitialClusterFromName(ec.Name)
	// etcd keeps the last SnapshotCatchUpEntries Raft entries in memory
	// (5,000 by default) for followers that fall behind. A single node
	// has no followers, and the server's group commit packs many
	// registrations into one entry, so those 5,000 entries held every
	// registration of the last tens of thousands: about 90 B per
	// instance at 100,000 instances (docs/benchmarks.md), for nothing.
	// etcd compacts its in-memory log every 100 applied entries; keep
	// that many.
	ec.SnapshotCatchUpEntries = singleNodeRaftEntries
	if c.cluster() {
		ec.SnapshotCatchUpEntries = etcdserver.DefaultSnapshotCatchUpEntries
		// A member of a cluster of beacon servers. On a restart the data
		// directory already knows the cluster and etcd rejoins by itself.
		ec.ListenPeerUrls = []url.URL{pu}
		ec.InitialCluster = c.EtcdInitialCluster
		ec.InitialClusterToken = c.EtcdClusterToken
		if ec.InitialClusterToken == "" {
			ec.InitialClusterToken = "beacon"
		}
		if c.EtcdPeerCertFile != "" {
			// The member's certificate serves its peer port and is its
			// client certificate to the others; each end checks the
			// other's against the CA, and etcd checks that a client
			// certificate names the address it connects from.
			ec.PeerTLSInfo = transport.TLSInfo{
				CertFile: c.EtcdPeerCertFile, KeyFile: c.EtcdPeerKeyFile,
				TrustedCAFile: c.EtcdPeerCAFile, ClientCertAuth: true,
			}
		}
	}
	// Bounded history: the server compacts to the last
	// EtcdCompactionRetention revisions every EtcdSpaceCheckInterval
	// (space.go). etcd's own revision compactor, with the same retention,
	// is the backstop; alone it would be too slow, as it runs every five
	// minutes, in which a client overwriting records can write gigabytes.
	// (It used to be an hour of history, which a fast writer turns into
	// gigabytes too.)
	ec.AutoCompactionMode = embed.CompactorModeRevision
	ec.AutoCompactionRetention = strconv.FormatInt(c.EtcdCompactionRetention, 10)
	ec.QuotaBackendBytes = c.EtcdQuotaBackendBytes
	ec.UnsafeNoFsync = c.EtcdUnsafeNoFsync
	return ec
}

// singleNodeRaftEntries is how many Raft entries a single node keeps in
// memory after compacting its log (see startEmbeddedEtcd).
const singleNodeRaftEntries = 100

// closeUnreadyEtcd stops an embedded etcd that never became ready (a
// member waiting for a quorum, say). embed.Etcd.Close alone waits for its
// client servers, which are only made once etcd is ready or stopping, so it
// would wait for ever; stopping the raft server first lets them give up.
func closeUnreadyEtcd(e *embed.Etcd) {
	e.Server.HardStop()
	e.Close()
}

// newEtcdClient connects to etcd; tlsCfg may be nil.
func newEtcdClient(endpoints []string, tlsCfg *tls.Config) (*clientv3.Client, error) {
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:            endpoints,
		TLS:                  tlsCfg,
		DialTimeout:          5 * time.Second,
		DialKeepAliveTime:    5 * time.Second,
		DialKeepAliveTimeout: 5 * time.Second,
		Logger:               zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("server: connecting to etcd %v: %w", endpoints, err)
	}
	return cli, nil
}

// progressNotifyOrdered reports whether etcd's requested progress
// notifications are ordered with the events (etcd #15220: fixed in 3.4.25
// and 3.5.8; 3.6 and later have it).
func progressNotifyOrdered(version string) bool {
	var major, minor, patch int
	if _, err := fmt.Sscanf(version, "%d.%d.%d", &major, &minor, &patch); err != nil {
		return false
	}
	switch {
	case major != 3:
		return major > 3
	case minor >= 6:
		return true
	case minor == 5:
		return patch >= 8
	case minor == 4:
		return patch >= 25
	}
	return false
}

// etcdVersion asks the first endpoint that answers for its version.
func etcdVersion(ctx context.Context, cli *clientv3.Client) (string, error) {
	var last error
	for _, ep := range cli.Endpoints() {
		st, err := cli.Status(ctx, ep)
		if err == nil {
			return st.Version, nil
		}
		last = err
	}
	return "", last
}

// embeddedRenewer renews sessions' leases in the embedded etcd itself,
// through the call etcd's LeaseKeepAlive handler makes (a follower
// forwards to the leader, as there): no gRPC exchange with ourselves per
// heartbeat.
func embeddedRenewer(es *etcdserver.EtcdServer) store.Renewer {
	return func(ctx context.Context, id int64) (int64, error) {
		ttl, err := es.LeaseRenew(ctx, lease.LeaseID(id))
		if errors.Is(err, lease.ErrLeaseNotFound) {
			return 0, fmt.Errorf("%w: %w", store.ErrLeaseNotFound, err)
		}
		return ttl, err
	}
}
