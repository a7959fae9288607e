package server_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

// dnsTool finds a DNS client on PATH. The test command installs them (as
// root on Debian: dnsutils, knot-dnsutils, ldnsutils); elsewhere the test
// is skipped unless BEACON_REQUIRE_DNS_TOOLS=1 makes their absence a
// failure.
func dnsTool(t *testing.T, name string) string {
	t.Helper()
	bin, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("BEACON_REQUIRE_DNS_TOOLS") == "1" {
			t.Fatalf("%s not on PATH and BEACON_REQUIRE_DNS_TOOLS=1: %v", name, err)
		}
		t.Skipf("%s not on PATH (install dnsutils, knot-dnsutils and ldnsutils)", name)
	}
	return bin
}

// toolAnswer is a DNS answer as a tool printed it.
type toolAnswer struct {
	status                        string
	flags                         []string
	answer, authority, additional [][]string // records as whitespace-separated fields: name ttl class type data...
	out                           string
}

var (
	statusRe = regexp.MustCompile(`(?:status|rcode): ([A-Z]+)`)
	flagsRe  = regexp.MustCompile(`(?i);; flags:([a-z ]*);`)
)

// parseToolAnswer reads the presentation format dig, kdig and drill
// share: a header line with the status, a flags line, and sections of
// records under ";; ANSWER SECTION:" and the like.
func parseToolAnswer(out string) toolAnswer {
	a := toolAnswer{out: out}
	if m := statusRe.FindStringSubmatch(out); m != nil {
		a.status = m[1]
	}
	if m := flagsRe.FindStringSubmatch(out); m != nil {
		a.flags = strings.Fields(m[1])
	}
	var section *[][]string
	for _, line := range strings.Split(out, "\n") {
		switch {
		case strings.HasPrefix(line, ";; ANSWER SECTION"):
			section = &a.answer
		case strings.HasPrefix(line, ";; AUTHORITY SECTION"):
			section = &a.authority
		case strings.HasPrefix(line, ";; ADDITIONAL"):
			section = &a.additional
		case strings.HasPrefix(line, ";"):
			section = nil
		case strings.TrimSpace(line) != "" && section != nil:
			*section = append(*section, strings.Fields(line))
		}
	}
	return a
}

func (a toolAnswer) has(flag string) bool { return slices.Contains(a.flags, flag) }

// column returns field i of every record of type rrtype, sorted.
func column(records [][]string, rrtype string, i int) []string {
	var out []string
	for _, r := range records {
		if len(r) > i && r[3] == rrtype {
			out = append(out, r[i])
		}
	}
	slices.Sort(out)
	return out
}

// TestDNSTools: the DNS interface's answers as three independent DNS
// implementations parse them — BIND's dig, Knot's kdig and ldns's drill.
func TestDNSTools(t *testing.T) {
	tools := map[string]string{"dig": dnsTool(t, "dig"), "kdig": dnsTool(t, "kdig"), "drill": dnsTool(t, "drill")}
	srv, c := dnsServer(t, nil)
	host, port, _ := net.SplitHostPort(srv.DNSAddr())
	ins := []registry.Instance{
		{Service: "web", ID: "w1", Address: "10.0.0.1", Port: 8080},
		{Service: "web", ID: "w2", Address: "10.0.0.2", Port: 8081, Weight: 300},
	}
	for i := range 40 {
		ins = append(ins, registry.Instance{Service: "big", ID: fmt.Sprint("b", i), Address: fmt.Sprintf("10.2.0.%d", i+1), Port: 7000 + i})
	}
	register(t, c, ins...)
	testutil.Eventually(t, 30*time.Second, "every instance over DNS", func() bool {
		return len(dnsQuery(t, "tcp", srv.DNSAddr(), "big.service.consul.", mdns.TypeA, 0).Answer) == 40 &&
			len(dnsQuery(t, "tcp", srv.DNSAddr(), "web.service.consul.", mdns.TypeA, 0).Answer) == 2
	})

	run := func(tool, name, qtype string, extra ...string) toolAnswer {
		t.Helper()
		var args []string
		switch tool {
		case "dig":
			args = append([]string{"@" + host, "-p", port, name, qtype, "+time=10", "+tries=2"}, extra...)
		case "kdig":
			args = append([]string{"@" + host, "-p", port, name, qtype, "+time=10", "+retry=1"}, extra...)
		case "drill":
			args = append(append([]string{"-p", port}, extra...), name, "@"+host, qtype)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		out, err := exec.CommandContext(ctx, tools[tool], args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", tool, strings.Join(args, " "), err, out)
		}
		return parseToolAnswer(string(out))
	}

	for _, tool := range []string{"dig", "kdig", "drill"} {
		t.Run(tool, func(t *testing.T) {
			a := run(tool, "web.service.consul.", "A")
			if a.status != "NOERROR" || !a.has("aa") || !slices.Equal(column(a.answer, "A", 4), []string{"10.0.0.1", "10.0.0.2"}) || !slices.Equal(column(a.answer, "A", 1), []string{"5", "5"}) {
				t.Errorf("A web: status %s flags %v answer %v; want NOERROR, aa, 10.0.0.1 and 10.0.0.2 with TTL 5\n%s", a.status, a.flags, a.answer, a.out)
			}

			a = run(tool, "_web._tcp.service.consul.", "SRV")
			var srvs []string
			for _, r := range a.answer {
				if len(r) == 8 && r[3] == "SRV" {
					srvs = append(srvs, strings.Join(r[4:], " "))
				}
			}
			slices.Sort(srvs)
			if want := []string{"1 100 8080 0a000001.addr.consul.", "1 300 8081 0a000002.addr.consul."}; a.status != "NOERROR" || !slices.Equal(srvs, want) {
				t.Errorf("SRV _web._tcp: status %s answer %v; want %v\n%s", a.status, srvs, want, a.out)
			}
			if got, want := column(a.additional, "A", 0), []string{"0a000001.addr.consul.", "0a000002.addr.consul."}; !slices.Equal(got, want) || !slices.Equal(column(a.additional, "A", 4), []string{"10.0.0.1", "10.0.0.2"}) {
				t.Errorf("SRV _web._tcp additional: %v; want the targets' A records\n%s", a.additional, a.out)
			}

			// NODATA and NXDOMAIN, each with the SOA whose minimum (the
			// last field) is the negative TTL.
			for _, tt := range []struct{ name, qtype, status string }{
				{"web.service.consul.", "AAAA", "NOERROR"},
				{"nope.service.consul.", "A", "NXDOMAIN"},
			} {
				a = run(tool, tt.name, tt.qtype)
				if a.status != tt.status || len(a.answer) != 0 || len(a.authority) != 1 || a.authority[0][3] != "SOA" || a.authority[0][len(a.authority[0])-1] != "5" || a.authority[0][1] != "5" {
					t.Errorf("%s %s: status %s answer %v authority %v; want %s, no answer, the SOA with TTL and minimum 5\n%s", tt.qtype, tt.name, a.status, a.answer, a.authority, tt.status, a.out)
				}
			}

			// Forty SRV records do not fit UDP: TC, and the whole answer
			// over TCP (dig and kdig retry by themselves; drill is asked).
			udp := map[string][]string{"dig": {"+ignore", "+noedns"}, "kdig": {"+ignore", "+noedns"}, "drill": nil}[tool]
			a = run(tool, "big.service.consul.", "SRV", udp...)
			if !a.has("tc") || len(column(a.answer, "SRV", 0)) >= 40 {
				t.Errorf("SRV big over UDP: flags %v with %d answers; want tc\n%s", a.flags, len(a.answer), a.out)
			}
			var full []string
			if tool == "drill" {
				full = []string{"-t"}
			}
			a = run(tool, "big.service.consul.", "SRV", full...)
			if a.has("tc") || len(column(a.answer, "SRV", 0)) != 40 || len(column(a.additional, "A", 0)) != 40 {
				t.Errorf("SRV big over TCP: flags %v, %d answers, %d additional; want all 40 and their addresses\n%s", a.flags, len(a.answer), len(a.additional), a.out)
			}
		})
	}
}
