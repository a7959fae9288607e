package server

import (
	"context"
	"fmt"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// startEmbeddedEtcd starts a single-node etcd and waits until it serves.
// lastWarning returns etcd's last warning, to say why it is not ready.
func startEmbeddedEtcd(ctx context.Context, c *Config, lg *zap.Logger, lastWarning func() string) (*embed.Etcd, error) {
	ec := embed.NewConfig()
	ec.Name = c.Name
	ec.Dir = filepath.Join(c.DataDir, "etcd")
	cu := url.URL{Scheme: "http", Host: c.EtcdClientAddr}
	pu := url.URL{Scheme: "http", Host: c.EtcdPeerAddr}
	ec.ListenClientUrls, ec.AdvertiseClientUrls = []url.URL{cu}, []url.URL{cu}
	ec.ListenPeerUrls, ec.AdvertisePeerUrls = []url.URL{pu}, []url.URL{pu}
	ec.InitialCluster = ec.InitialClusterFromName(ec.Name)
	if c.EtcdInitialCluster != "" {
		// A member of a cluster of beacon servers. On a restart the data
		// directory already knows the cluster and etcd rejoins by itself.
		ec.InitialCluster = c.EtcdInitialCluster
		ec.InitialClusterToken = c.EtcdClusterToken
		if ec.InitialClusterToken == "" {
			ec.InitialClusterToken = "beacon"
		}
	}
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(lg)
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
	walProblem := checkEtcdLog(ec.Dir)
	if walProblem != nil {
		lg.Error("embedded etcd's data is damaged", zap.Error(walProblem))
	}
	e, err := embed.StartEtcd(ec)
	if err != nil {
		// A port clash names the flag that chose the port.
		for flag, addr := range map[string]string{"--etcd-client-addr": c.EtcdClientAddr, "--etcd-peer-addr": c.EtcdPeerAddr} {
			if strings.Contains(err.Error(), addr) {
				return nil, fmt.Errorf("server: embedded etcd: %s %s: %w (another etcd, or another beacon server, listens there: pick other ports with --etcd-client-addr and --etcd-peer-addr, or another --addr)", flag, addr, err)
			}
		}
		return nil, fmt.Errorf("server: starting embedded etcd in %s: %w", ec.Dir, err)
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

// closeUnreadyEtcd stops an embedded etcd that never became ready (a
// member waiting for a quorum, say). embed.Etcd.Close alone waits for its
// client servers, which are only made once etcd is ready or stopping, so it
// would wait for ever; stopping the raft server first lets them give up.
func closeUnreadyEtcd(e *embed.Etcd) {
	e.Server.HardStop()
	e.Close()
}

func newEtcdClient(endpoints []string) (*clientv3.Client, error) {
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:            endpoints,
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
