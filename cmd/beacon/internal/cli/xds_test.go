package cli_test

import (
	"encoding/json"
	"strings"
	"testing"

	"google.golang.org/grpc/xds"
)

// The bootstrap file is one grpc-go's xDS resolver accepts, naming the
// control plane, the node and, with certificates, TLS.
func TestXDSBootstrap(t *testing.T) {
	code, out, errs := run("xds", "bootstrap", "--service", "checkout", "--xds-server", "127.0.0.1:18000", "--zone", "eu-1")
	if code != 0 {
		t.Fatalf("beacon xds bootstrap = %d, stderr %q", code, errs)
	}
	if _, err := xds.NewXDSResolverWithConfigForTesting([]byte(out)); err != nil {
		t.Fatalf("grpc-go refuses the bootstrap: %v\n%s", err, out)
	}
	var b struct {
		XDSServers []struct {
			ServerURI    string                  `json:"server_uri"`
			ChannelCreds []struct{ Type string } `json:"channel_creds"`
		} `json:"xds_servers"`
		Node struct {
			ID, Cluster string
			Locality    struct{ Zone string }
		}
	}
	if err := json.Unmarshal([]byte(out), &b); err != nil {
		t.Fatal(err)
	}
	if b.XDSServers[0].ServerURI != "127.0.0.1:18000" || b.XDSServers[0].ChannelCreds[0].Type != "insecure" ||
		b.Node.Cluster != "checkout" || !strings.HasPrefix(b.Node.ID, "checkout-") || b.Node.Locality.Zone != "eu-1" {
		t.Fatalf("bootstrap = %s", out)
	}
	code, out, _ = run("xds", "bootstrap", "--service", "checkout", "--xds-ca-cert", "ca.pem", "--xds-client-cert", "c.pem", "--xds-client-key", "k.pem")
	if code != 0 || !strings.Contains(out, `"type": "tls"`) || !strings.Contains(out, "ca_certificate_file") {
		t.Fatalf("with TLS = %d, %s", code, out)
	}
	if code, _, errs := run("xds", "bootstrap", "--service", "Bad_Name"); code == 0 || !strings.Contains(errs, "--service") {
		t.Fatalf("a bad --service = %d, %q", code, errs)
	}
}
