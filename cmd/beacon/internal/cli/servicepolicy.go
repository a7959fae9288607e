package cli

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/wire"
	"beacon.dev/beacon/registry"
)

// policyFlags are service-config's flags, by the part of the policy they
// set.
type policyFlags struct {
	lb      string
	choices uint32
	header  string
	minRing uint64
	maxRing uint64

	retryOn      []string
	retries      uint32
	retryBase    time.Duration
	retryMax     time.Duration
	odConsec     uint32
	odInterval   time.Duration
	odEjection   time.Duration
	odMaxPercent uint32
	odFailures   uint32
	odHosts      uint32
	odVolume     uint32

	reset []string
}

var (
	lbFlags      = []string{"lb", "choice-count", "hash-header", "min-ring-size", "max-ring-size"}
	retryFlags   = []string{"retry-on", "num-retries", "retry-base-backoff", "retry-max-backoff"}
	outlierFlags = []string{"outlier-consecutive-failures", "outlier-interval", "outlier-base-ejection-time", "outlier-max-ejection-percent",
		"outlier-failure-percentage", "outlier-minimum-hosts", "outlier-request-volume"}
)

func newServiceConfigCmd(g *globals) *cobra.Command {
	var f policyFlags
	cmd := &cobra.Command{
		Use:   "service-config SERVICE",
		Short: "Show a service's settings, or set the balancing, retry and outlier-detection policies its xDS clients follow",
		Long: `service-config shows a service's settings: its protection threshold (set it
with beacon protect) and the policies its xDS clients follow (docs/xds.md).
With flags it sets those policies. The flags come in three parts, and each
part given replaces the service's whole part (a flag left out of it takes
its default); a part not given is left as it is:

  load balancing     --lb round_robin|least_request|ring_hash, --choice-count
                     (least_request), --hash-header, --min-ring-size,
                     --max-ring-size (ring_hash)
  retries            --retry-on CODES, --num-retries, --retry-base-backoff,
                     --retry-max-backoff
  outlier detection  --outlier-*

--reset lb,retry,outlier puts parts back to beacon's defaults (round
robin, no retries, the default outlier detection).`,
		Example: `  beacon service-config orders
  beacon service-config orders --lb ring_hash --hash-header x-user-id
  beacon service-config orders --retry-on unavailable,resource-exhausted --num-retries 2
  beacon service-config orders --outlier-failure-percentage 50 --outlier-interval 5s
  beacon service-config orders --reset lb,retry`,
		Args: argsNamed("SERVICE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			change, err := f.change(cmd.Flags())
			if err != nil {
				return err
			}
			return g.call(cmd, func(ctx context.Context, c *client.Client) error {
				var cfg client.ServiceConfig
				var err error
				if change == (client.PolicyChange{}) {
					cfg, err = c.GetServiceConfig(ctx, args[0], client.InNamespace(g.namespace))
				} else {
					cfg, err = c.SetServicePolicy(ctx, args[0], change, client.InNamespace(g.namespace))
				}
				if err != nil {
					return err
				}
				if g.output == "json" {
					return g.printJSON(&beaconv1.ServiceConfig{
						Namespace: g.namespace, Service: args[0],
						ProtectionThreshold: cfg.ProtectionThreshold, ProtectionThresholdDefault: cfg.ProtectionThresholdDefault,
						LoadBalancing:    wire.LoadBalancingToProto(cfg.Policy.LoadBalancing),
						RetryPolicy:      wire.RetryPolicyToProto(cfg.Policy.Retry),
						OutlierDetection: wire.OutlierDetectionToProto(cfg.Policy.OutlierDetection),
					})
				}
				printServiceConfig(g.stdout, g.namespace+"/"+args[0], cfg)
				return nil
			})
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&f.lb, "lb", "", "load balancing: round_robin (beacon weights steer it), least_request or ring_hash")
	fs.Uint32Var(&f.choices, "choice-count", 0, "least_request: endpoints sampled per call, 2 to 10 (default 2)")
	fs.StringVar(&f.header, "hash-header", "", "ring_hash (required): the request header whose value picks the instance, a lowercase gRPC metadata key")
	fs.Uint64Var(&f.minRing, "min-ring-size", 0, "ring_hash: the ring's least size (default 1024)")
	fs.Uint64Var(&f.maxRing, "max-ring-size", 0, "ring_hash: the ring's greatest size, at most 8388608 (default 8388608; grpc-go caps it at 4096)")
	fs.StringSliceVar(&f.retryOn, "retry-on", nil, "retry calls failing with these gRPC codes: cancelled, deadline-exceeded, internal, resource-exhausted, unavailable (UNAVAILABLE works too)")
	fs.Uint32Var(&f.retries, "num-retries", 0, "retries of a call at most, 1 to 4 (default 1)")
	fs.DurationVar(&f.retryBase, "retry-base-backoff", 0, "the first retry's backoff bound, 1ms to 30s (default 25ms)")
	fs.DurationVar(&f.retryMax, "retry-max-backoff", 0, "the backoff's cap, --retry-base-backoff to 5m (default 10 times the base)")
	fs.Uint32Var(&f.odConsec, "outlier-consecutive-failures", 0, "eject after that many failures in a row, 1 to 1000 (default 5; Envoy reads it, gRPC clients do not)")
	fs.DurationVar(&f.odInterval, "outlier-interval", 0, "how often ejections are decided, 100ms to 1h (default 10s)")
	fs.DurationVar(&f.odEjection, "outlier-base-ejection-time", 0, "the first ejection's length, 100ms to 1h (default 30s)")
	fs.Uint32Var(&f.odMaxPercent, "outlier-max-ejection-percent", 0, "the share of instances ejected at once at most, 1 to 100 (default 50)")
	fs.Uint32Var(&f.odFailures, "outlier-failure-percentage", 0, "eject an instance failing more than this percentage of its calls in an interval, 1 to 100 (default: off)")
	fs.Uint32Var(&f.odHosts, "outlier-minimum-hosts", 0, "with --outlier-failure-percentage: instances with enough calls needed to judge any, 1 to 1000 (default 5)")
	fs.Uint32Var(&f.odVolume, "outlier-request-volume", 0, "with --outlier-failure-percentage: calls an instance needs in an interval to be judged (default 50)")
	fs.StringSliceVar(&f.reset, "reset", nil, "put these parts back to the defaults: lb, retry, outlier")
	return cmd
}

// change turns the flags given into a PolicyChange, refusing a part both
// set and reset. Validation is the SDK's (and the server's): its errors
// name the API's fields.
func (f *policyFlags) change(fs *pflag.FlagSet) (client.PolicyChange, error) {
	var c client.PolicyChange
	given := func(names []string) bool {
		for _, n := range names {
			if fs.Changed(n) {
				return true
			}
		}
		return false
	}
	reset := map[string]bool{}
	for _, r := range f.reset {
		switch r {
		case "lb", "retry", "outlier":
			reset[r] = true
		default:
			return c, fmt.Errorf("invalid --reset %q: must name lb, retry or outlier", r)
		}
	}
	for part, names := range map[string][]string{"lb": lbFlags, "retry": retryFlags, "outlier": outlierFlags} {
		if reset[part] && given(names) {
			return c, fmt.Errorf("invalid --reset %s: the %s flags set that part; give one or the other", part, part)
		}
	}
	switch {
	case reset["lb"]:
		c.LoadBalancing = &registry.LoadBalancing{}
	case given(lbFlags):
		lb := registry.LoadBalancing{ChoiceCount: f.choices, HashHeader: f.header, MinRingSize: f.minRing, MaxRingSize: f.maxRing}
		if f.lb != "" {
			p, err := registry.ParseLBPolicy(strings.ReplaceAll(strings.ToLower(f.lb), "-", "_"))
			if err != nil {
				return c, fmt.Errorf("invalid --lb %q: must be round_robin, least_request or ring_hash", f.lb)
			}
			lb.Policy = p
		}
		c.LoadBalancing = &lb
	}
	switch {
	case reset["retry"]:
		c.Retry = &registry.RetryPolicy{}
	case given(retryFlags):
		names := make([]string, len(f.retryOn))
		for i, n := range f.retryOn {
			names[i] = strings.ReplaceAll(strings.ToLower(strings.TrimSpace(n)), "_", "-") // UNAVAILABLE, DEADLINE_EXCEEDED
		}
		on, err := registry.ParseRetryOn(names)
		if err != nil {
			return c, err
		}
		c.Retry = &registry.RetryPolicy{On: on, NumRetries: f.retries, BaseBackoff: f.retryBase, MaxBackoff: f.retryMax}
	}
	switch {
	case reset["outlier"]:
		c.OutlierDetection = &registry.OutlierDetection{}
	case given(outlierFlags):
		c.OutlierDetection = &registry.OutlierDetection{
			ConsecutiveFailures: f.odConsec, Interval: f.odInterval, BaseEjectionTime: f.odEjection, MaxEjectionPercent: f.odMaxPercent,
			FailurePercentageThreshold: f.odFailures, FailurePercentageMinimumHosts: f.odHosts, FailurePercentageRequestVolume: f.odVolume,
		}
	}
	return c, nil
}

// printServiceConfig shows the settings in effect, defaults filled in.
func printServiceConfig(w io.Writer, name string, cfg client.ServiceConfig) {
	p := cfg.Policy.Effective()
	fmt.Fprintf(w, "%s (revision %d)\n", name, cfg.Revision)
	threshold := fmt.Sprintf("%g", cfg.ProtectionThreshold)
	if cfg.ProtectionThresholdDefault {
		threshold += " (the server's default)"
	}
	fmt.Fprintf(w, "  protection threshold  %s\n", threshold)
	lb := p.LoadBalancing
	switch lb.Policy {
	case registry.LBLeastRequest:
		fmt.Fprintf(w, "  load balancing        least_request, %d choices\n", lb.ChoiceCount)
	case registry.LBRingHash:
		fmt.Fprintf(w, "  load balancing        ring_hash on header %s, ring of %d to %d\n", lb.HashHeader, lb.MinRingSize, lb.MaxRingSize)
	default:
		fmt.Fprintf(w, "  load balancing        %s\n", lb.Policy)
	}
	if r := p.Retry; r.On != 0 {
		fmt.Fprintf(w, "  retries               on %s: at most %d, backoff %v to %v\n", r.On, r.NumRetries, r.BaseBackoff, r.MaxBackoff)
	} else {
		fmt.Fprintf(w, "  retries               none\n")
	}
	od := p.OutlierDetection
	fp := "off"
	if od.FailurePercentageThreshold != 0 {
		fp = fmt.Sprintf("over %d%% (judged with %d instances of %d calls)", od.FailurePercentageThreshold, od.FailurePercentageMinimumHosts, od.FailurePercentageRequestVolume)
	}
	fmt.Fprintf(w, "  outlier detection     every %v: failure percentage %s; %d failures in a row (Envoy only); eject for %v and more, at most %d%% of the instances\n",
		od.Interval, fp, od.ConsecutiveFailures, od.BaseEjectionTime, od.MaxEjectionPercent)
}
