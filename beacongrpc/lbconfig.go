package beacongrpc

import (
	"encoding/json"
	"fmt"
	"time"

	"google.golang.org/grpc/serviceconfig"

	"beacon.dev/beacon/balancer"
	"beacon.dev/beacon/outlier"
)

// lbConfig is a beacon policy's configuration in a gRPC service config:
//
//	{"loadBalancingConfig": [{"beacon_p2c": {
//	    "zone": "eu-1", "zoneMinHealthy": 0.7, "zoneSpill": 2,
//	    "panicThreshold": 0.5, "slowStart": "30s",
//	    "outlier": {"interval": "1s", "consecutiveFailures": 3,
//	                "failureRate": 0.5, "minRequests": 10,
//	                "baseEjection": "5s", "maxEjection": "1m",
//	                "maxEjected": 0.5}}}]}
//
// Shares are fractions in [0, 1], as everywhere in the SDK.
//
// Absent fields keep the policy's registered values; durations are Go
// duration strings ("500ms", "1.5s").
type lbConfig struct {
	serviceconfig.LoadBalancingConfig `json:"-"`

	balancer balancer.Config
	outlier  outlier.Config
}

type lbConfigJSON struct {
	Zone           *string  `json:"zone"`
	ZoneMinHealthy *float64 `json:"zoneMinHealthy"`
	ZoneSpill      *float64 `json:"zoneSpill"`
	PanicThreshold *float64 `json:"panicThreshold"`
	SlowStart      *string  `json:"slowStart"`
	Outlier        *struct {
		Interval            *string  `json:"interval"`
		ConsecutiveFailures *int     `json:"consecutiveFailures"`
		FailureRate         *float64 `json:"failureRate"`
		MinRequests         *int     `json:"minRequests"`
		BaseEjection        *string  `json:"baseEjection"`
		MaxEjection         *string  `json:"maxEjection"`
		MaxEjected          *float64 `json:"maxEjected"`
	} `json:"outlier"`
}

// ParseConfig implements grpc's balancer.ConfigParser: a bad field is
// refused with its name, and gRPC keeps the previous service config.
func (b lbBuilder) ParseConfig(raw json.RawMessage) (serviceconfig.LoadBalancingConfig, error) {
	var j lbConfigJSON
	if err := json.Unmarshal(raw, &j); err != nil {
		return nil, fmt.Errorf("beacongrpc: %s config: %w", b.name, err)
	}
	cfg := &lbConfig{balancer: b.cfg, outlier: b.outlier}
	var errs []error
	dur := func(field string, s *string, dst *time.Duration) {
		if s == nil {
			return
		}
		d, err := time.ParseDuration(*s)
		if err != nil || d < 0 {
			errs = append(errs, fmt.Errorf("%s: %q is not a non-negative duration such as \"1.5s\"", field, *s))
			return
		}
		*dst = d
	}
	set := func(dst *int, v *int) {
		if v != nil {
			*dst = *v
		}
	}
	setF := func(dst *float64, v *float64) {
		if v != nil {
			*dst = *v
		}
	}
	if j.Zone != nil {
		cfg.balancer.Zone = *j.Zone
	}
	setF(&cfg.balancer.ZoneMinHealthy, j.ZoneMinHealthy)
	if j.ZoneSpill != nil {
		cfg.balancer.ZoneSpill = *j.ZoneSpill
	}
	setF(&cfg.balancer.PanicThreshold, j.PanicThreshold)
	dur("slowStart", j.SlowStart, &cfg.balancer.SlowStart)
	if o := j.Outlier; o != nil {
		dur("outlier.interval", o.Interval, &cfg.outlier.Interval)
		dur("outlier.baseEjection", o.BaseEjection, &cfg.outlier.BaseEjection)
		dur("outlier.maxEjection", o.MaxEjection, &cfg.outlier.MaxEjection)
		set(&cfg.outlier.ConsecutiveFailures, o.ConsecutiveFailures)
		set(&cfg.outlier.MinRequests, o.MinRequests)
		setF(&cfg.outlier.MaxEjected, o.MaxEjected)
		if o.FailureRate != nil {
			cfg.outlier.FailureRate = *o.FailureRate
		}
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("beacongrpc: %s config: %v", b.name, errs)
	}
	// Build once to validate every field with the packages' own rules.
	bal, err := balancer.New(b.builder, cfg.balancer, balancer.WithOutlierDetection(cfg.outlier))
	if err != nil {
		return nil, fmt.Errorf("beacongrpc: %s config: %w", b.name, err)
	}
	bal.Close()
	return cfg, nil
}
