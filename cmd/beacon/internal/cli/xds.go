package cli

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"

	"github.com/spf13/cobra"

	"beacon.dev/beacon/registry"
)

func newXDSCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "xds",
		Short: "The xDS control plane: bootstrap files for proxyless gRPC clients",
	}
	hideClientFlags(cmd)
	cmd.AddCommand(newXDSBootstrapCmd(g))
	return cmd
}

type xdsBootstrap struct {
	service, server, zone, nodeID string
	caCert, cert, key             string
}

func newXDSBootstrapCmd(g *globals) *cobra.Command {
	b := &xdsBootstrap{}
	cmd := &cobra.Command{
		Use:   "bootstrap --service NAME --xds-server HOST:PORT",
		Short: "Print a gRPC xDS bootstrap file (GRPC_XDS_BOOTSTRAP) for a client of beacon's xDS control plane",
		Long: `bootstrap prints the JSON file a proxyless gRPC client (any language)
reads from GRPC_XDS_BOOTSTRAP to find beacon's xDS control plane
(beacon server --xds-addr). The client then dials xds:///SERVICE (or
xds:///SERVICE.NAMESPACE outside the default namespace). --service names
the client's own service (the node's cluster, and its id with a random
suffix); --zone its zone.

With --xds-ca-cert the client talks TLS to the control plane, and with
--xds-client-cert and --xds-client-key it presents a certificate: beacon's ACLs
read its common name as a role (docs/security.md). gRPC's bootstrap has no
place for a bearer token, so with ACLs on, clients authenticate with a
certificate. See docs/xds.md.`,
		Example: `  beacon xds bootstrap --service checkout --xds-server 127.0.0.1:18000 > xds-bootstrap.json
  GRPC_XDS_BOOTSTRAP=$PWD/xds-bootstrap.json python client.py   # dials xds:///orders`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out, err := b.render()
			if err != nil {
				return err
			}
			_, err = fmt.Fprintln(g.stdout, string(out))
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&b.service, "service", "", "the client's own service (node cluster and id)")
	f.StringVar(&b.server, "xds-server", "127.0.0.1:18000", "the beacon server's --xds-addr")
	f.StringVar(&b.zone, "zone", "", "the client's zone (node locality)")
	f.StringVar(&b.nodeID, "node-id", "", "the node id (default: SERVICE-RANDOM)")
	f.StringVar(&b.caCert, "xds-ca-cert", "", "talk TLS to the control plane, trusting this CA (PEM file)")
	f.StringVar(&b.cert, "xds-client-cert", "", "present this client certificate (PEM file; its CN names an ACL role)")
	f.StringVar(&b.key, "xds-client-key", "", "the --xds-client-cert's key (PEM file)")
	return cmd
}

func (b *xdsBootstrap) render() ([]byte, error) {
	if err := registry.ValidateName("service", b.service); err != nil {
		return nil, fmt.Errorf("--service: %w", err)
	}
	if b.zone != "" {
		if err := registry.ValidateName("zone", b.zone); err != nil {
			return nil, fmt.Errorf("--zone: %w", err)
		}
	}
	if (b.cert == "") != (b.key == "") {
		return nil, errors.New("--xds-client-cert and --xds-client-key: give both or neither")
	}
	if b.cert != "" && b.caCert == "" {
		return nil, errors.New("--xds-client-cert needs --xds-ca-cert: a client certificate is presented over TLS")
	}
	id := b.nodeID
	if id == "" {
		var r [4]byte
		_, _ = rand.Read(r[:])
		id = b.service + "-" + hex.EncodeToString(r[:])
	}
	creds := []map[string]any{{"type": "insecure"}}
	if b.caCert != "" {
		cfg := map[string]string{}
		for k, path := range map[string]string{"ca_certificate_file": b.caCert, "certificate_file": b.cert, "private_key_file": b.key} {
			if path == "" {
				continue
			}
			abs, err := filepath.Abs(path)
			if err != nil {
				return nil, err
			}
			cfg[k] = abs
		}
		creds = []map[string]any{{"type": "tls", "config": cfg}}
	}
	node := map[string]any{"id": id, "cluster": b.service}
	if b.zone != "" {
		node["locality"] = map[string]string{"zone": b.zone}
	}
	return json.MarshalIndent(map[string]any{
		"xds_servers": []map[string]any{{"server_uri": b.server, "channel_creds": creds, "server_features": []string{"xds_v3"}}},
		"node":        node,
	}, "", "  ")
}
