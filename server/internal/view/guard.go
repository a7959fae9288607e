package view

import (
	"context"
	"time"

	"beacon.dev/beacon/registry"
)

// GuardConfig tunes the mass-expiry guard: when the sessions that expire
// within Window hold more than Share of a namespace's instances (and are
// at least MinSessions), their instances are not dropped but kept, marked
// Suspect and still routable, for Grace — a server cut off from its
// clients, or an etcd that stalled, must not empty healthy services. A
// single expiry, or a few, go at once as before.
type GuardConfig struct {
	Share       float64       // default 0.3; negative disables the guard
	MinSessions int           // default 3
	Window      time.Duration // default 10s
	Grace       time.Duration // default 60s
}

func (c *GuardConfig) defaults() {
	if c.Share == 0 {
		c.Share = 0.3
	}
	if c.MinSessions == 0 {
		c.MinSessions = 3
	}
	if c.Window == 0 {
		c.Window = 10 * time.Second
	}
	if c.Grace == 0 {
		c.Grace = time.Minute
	}
}

type loss struct {
	at      time.Time
	session int64
	insts   []*registry.Instance // as they were before they went
}

// guard is the view's record of recent expiries and held instances; it is
// guarded by the view's mu.
type guard struct {
	cfg         GuardConfig
	losses      map[string][]loss                        // by namespace, within Window
	activeUntil map[string]time.Time                     // by namespace
	held        map[registry.InstanceKey]time.Time       // held instances, until
	triggered   func(ns string, sessions, instances int) // may be nil
}

func newGuard(cfg GuardConfig) *guard {
	cfg.defaults()
	return &guard{cfg: cfg, losses: map[string][]loss{}, activeUntil: map[string]time.Time{}, held: map[registry.InstanceKey]time.Time{}}
}

// SetGuard configures the mass-expiry guard. Call it before Run.
func (v *View) SetGuard(cfg GuardConfig, triggered func(ns string, sessions, instances int)) {
	v.guard = newGuard(cfg)
	v.guard.triggered = triggered
}

// deleted is an instance deletion seen in one watch response.
type deleted struct {
	key registry.InstanceKey
	rev int64
}

// holdLocked decides which of a response's instance deletions the guard
// holds back, and which instances lost earlier in the window it brings
// back (the guard only knows a loss is massive once enough sessions went;
// the first ones reappear, suspect, a moment after they vanished). An
// instance is lost with its session when it was ephemeral and its
// session's key was deleted at the same revision (the lease went: expiry
// or revocation; an explicit deregistration deletes the instance alone).
func (v *View) holdLocked(now time.Time, dels []deleted, sessionGone map[int64]int64) (hold map[registry.InstanceKey]bool, restore []*registry.Instance) {
	g := v.guard
	if g == nil || g.cfg.Share < 0 || len(dels) == 0 {
		return nil, nil
	}
	lost := map[string][]registry.InstanceKey{}
	bySession := map[string]map[int64][]*registry.Instance{}
	for _, d := range dels {
		old := v.instanceLocked(d.key)
		if old == nil || !old.Ephemeral() || old.Suspect || sessionGone[old.SessionID] != d.rev {
			continue
		}
		lost[d.key.Namespace] = append(lost[d.key.Namespace], d.key)
		if bySession[d.key.Namespace] == nil {
			bySession[d.key.Namespace] = map[int64][]*registry.Instance{}
		}
		bySession[d.key.Namespace][old.SessionID] = append(bySession[d.key.Namespace][old.SessionID], old)
	}
	for ns, keys := range lost {
		recent := g.losses[ns][:0]
		for _, l := range g.losses[ns] {
			if now.Sub(l.at) < g.cfg.Window {
				recent = append(recent, l)
			}
		}
		earlier := 0
		for _, l := range recent {
			earlier += len(l.insts)
		}
		previous := recent
		for id, insts := range bySession[ns] {
			recent = append(recent, loss{at: now, session: id, insts: insts})
		}
		g.losses[ns] = recent
		distinct := map[int64]bool{}
		total := 0
		for _, l := range recent {
			distinct[l.session] = true
			total += len(l.insts)
		}
		// The base is what the namespace held before these losses.
		base := v.namespaceSizeLocked(ns) + earlier
		active := now.Before(g.activeUntil[ns])
		if !active && (len(distinct) < g.cfg.MinSessions || float64(total) <= g.cfg.Share*float64(base)) {
			continue
		}
		if !active {
			v.log.Warn("view: mass session expiry: holding the instances back as suspects",
				"namespace", ns, "sessions", len(distinct), "instances", total, "of", base, "grace", g.cfg.Grace)
			if g.triggered != nil {
				g.triggered(ns, len(distinct), total)
			}
			for _, l := range previous { // lost in the window before the guard knew
				for _, in := range l.insts {
					k := in.Key()
					if _, held := g.held[k]; held || v.instanceLocked(k) != nil {
						continue // held already, or registered again
					}
					kept := in.Clone()
					kept.Suspect = true
					restore = append(restore, &kept)
					g.held[k] = now.Add(g.cfg.Grace)
				}
			}
		}
		g.activeUntil[ns] = now.Add(g.cfg.Window)
		if hold == nil {
			hold = map[registry.InstanceKey]bool{}
		}
		for _, k := range keys {
			hold[k] = true
			g.held[k] = now.Add(g.cfg.Grace)
		}
	}
	return hold, restore
}

// namespaceSizeLocked counts a namespace's instances in the view.
func (v *View) namespaceSizeLocked(ns string) int {
	n := 0
	for sk, s := range v.services {
		if sk.Namespace == ns {
			n += len(s.Instances)
		}
	}
	return n
}

func (v *View) instanceLocked(k registry.InstanceKey) *registry.Instance {
	s := v.services[registry.ServiceKey{Namespace: k.Namespace, Service: k.Service}]
	if s == nil {
		return nil
	}
	for _, in := range s.Instances {
		if in.ID == k.ID {
			return in
		}
	}
	return nil
}

// expiredHoldsLocked returns the held instances whose grace has ended and
// forgets them.
func (v *View) expiredHoldsLocked(now time.Time) []registry.InstanceKey {
	if v.guard == nil {
		return nil
	}
	var out []registry.InstanceKey
	for k, until := range v.guard.held {
		if !now.Before(until) {
			out = append(out, k)
			delete(v.guard.held, k)
		}
	}
	return out
}

// HeldCount returns the instances the guard holds.
func (v *View) HeldCount() int {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if v.guard == nil {
		return 0
	}
	return len(v.guard.held)
}

// releaseLoop ends holds whose grace is over. Releasing must publish at a
// new etcd revision (revisions only grow), so it writes a marker key whose
// event, when the watch delivers it, drops the expired holds.
func (v *View) releaseLoop(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		v.mu.RLock()
		due := false
		if v.guard != nil {
			now := time.Now()
			for _, until := range v.guard.held {
				if !now.Before(until) {
					due = true
					break
				}
			}
		}
		v.mu.RUnlock()
		if due {
			wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			if _, err := v.cli.Put(wctx, v.layout.GuardMarkerKey(), time.Now().UTC().Format(time.RFC3339Nano)); err != nil {
				v.log.Warn("view: writing the guard's release marker", "err", err)
			}
			cancel()
		}
	}
}
