package health

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strings"
	"syscall"

	"beacon.dev/beacon/registry"
)

// Targets is where checks may probe, so that the server cannot be made a
// proxy into the network it sits in (a cloud metadata service, an admin
// port on another host): an instance's own registered address, and the
// networks and host names an operator allows (--check-allow-targets).
// Link-local and metadata addresses are refused always, at dial time, so
// that no name that resolves to them (DNS rebinding included) gets
// through.
type Targets struct {
	nets  []netip.Prefix
	hosts map[string]bool
}

// ParseTargets reads allow-list entries: CIDRs, IP addresses or host names.
func ParseTargets(entries []string) (Targets, error) {
	t := Targets{hosts: map[string]bool{}}
	for _, e := range entries {
		e = strings.TrimSpace(e)
		switch {
		case e == "":
			continue
		case strings.Contains(e, "/"):
			p, err := netip.ParsePrefix(e)
			if err != nil {
				return Targets{}, fmt.Errorf("invalid --check-allow-targets entry %q: %v", e, err)
			}
			t.nets = append(t.nets, p.Masked())
		default:
			if ip, err := netip.ParseAddr(e); err == nil {
				t.nets = append(t.nets, netip.PrefixFrom(ip, ip.BitLen()))
				continue
			}
			if strings.ContainsAny(e, " :@") {
				return Targets{}, fmt.Errorf("invalid --check-allow-targets entry %q: want a CIDR, an IP address or a host name", e)
			}
			t.hosts[strings.ToLower(e)] = true
		}
	}
	return t, nil
}

// Check tells whether the instance's checks probe only where they may; the
// error names the field and the flag.
func (t Targets) Check(in *registry.Instance) error {
	for i := range in.Checks {
		c := &in.Checks[i]
		if c.Kind == registry.CheckTTL || c.Target == "" {
			continue // TTL checks probe nothing; the default target is the instance
		}
		host, err := targetHost(c)
		if err != nil {
			continue // the registry's own validation reports it
		}
		if t.allows(in.Address, host) {
			continue
		}
		return &registry.FieldError{
			Field: fmt.Sprintf("checks[%d].target", i), Value: c.Target,
			Reason: fmt.Sprintf("must probe the instance's own address %s, or a host the server allows with --check-allow-targets (%s is not)", in.Address, host),
		}
	}
	return nil
}

func (t Targets) allows(own, host string) bool {
	if strings.EqualFold(host, own) || t.hosts[strings.ToLower(host)] {
		return true
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return false
	}
	if ownIP, err := netip.ParseAddr(own); err == nil && ownIP.Unmap() == ip.Unmap() {
		return true
	}
	for _, p := range t.nets {
		if p.Contains(ip.Unmap()) || p.Contains(ip) {
			return true
		}
	}
	return false
}

// targetHost is the host a check's target names.
func targetHost(c *registry.Check) (string, error) {
	target := c.Target
	if c.Kind == registry.CheckHTTP {
		u, err := url.Parse(target)
		if err != nil {
			return "", err
		}
		return u.Hostname(), nil
	}
	host, _, err := net.SplitHostPort(target)
	return strings.Trim(host, "[]"), err
}

// metadataAddrs are cloud metadata services outside the link-local ranges.
var metadataAddrs = map[netip.Addr]bool{
	netip.MustParseAddr("fd00:ec2::254"):   true, // AWS, over IPv6
	netip.MustParseAddr("100.100.100.200"): true, // Alibaba Cloud
}

// refusedAddr: addresses no check may reach, whatever the allow-list.
func refusedAddr(ip netip.Addr) bool {
	ip = ip.Unmap()
	return ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() || ip.IsMulticast() ||
		ip.IsUnspecified() || metadataAddrs[ip]
}

// errRefusedAddr is a probe's dial to a refused address.
var errRefusedAddr = errors.New("link-local or metadata address: health checks may not reach it")

// refuseAddrs is a net.Dialer control hook: it runs on the resolved
// address, just before the connection is made.
func refuseAddrs(_ context.Context, _, address string, _ syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return nil
	}
	if refusedAddr(ap.Addr()) {
		return fmt.Errorf("%s: %w", ap.Addr(), errRefusedAddr)
	}
	return nil
}
