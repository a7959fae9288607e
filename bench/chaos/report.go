package main

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc/status"
)

// summary is what a run comes to.
type summary struct {
	Requests, Failures int
	SuccessRate        float64
	P50, P99, Max      time.Duration
	// Eject: fault start → the start of the last attempt sent to the
	// faulty instance while the fault lasted (-1: none).
	Eject time.Duration
	// Recover: fault start → the end of the last failed call (0: none
	// failed after the fault began).
	Recover time.Duration
	// VictimShare: the faulty instance's share of answers during the
	// fault; Shares: every instance's share at the end of the run (the
	// last 5 s, or less if the fault ended later).
	VictimShare float64
	Shares      map[string]float64
}

func summarize(r *run) summary {
	s := summary{Requests: len(r.Calls), Eject: -1}
	var lat []time.Duration
	inFault, victimAnswers := 0, 0
	last := map[string]int{}
	lastN := 0
	window := min(5*time.Second, r.Total-r.FaultEnd) // the shares' window: the end of the run
	for _, c := range r.Calls {
		lat = append(lat, c.latency)
		if c.err != nil {
			s.Failures++
			if end := c.start + c.latency; c.start+c.latency >= r.FaultStart {
				s.Recover = max(s.Recover, end-r.FaultStart)
			}
		}
		during := c.start >= r.FaultStart && c.start < r.FaultEnd
		if during && c.err == nil {
			inFault++
			if c.peer == r.Victim {
				victimAnswers++
			}
		}
		if c.start >= r.Total-window && c.err == nil {
			last[c.peer]++
			lastN++
		}
	}
	for _, a := range r.Attempts {
		if r.Victim != "" && a.peer == r.Victim && a.start >= r.FaultStart && a.start < r.FaultEnd {
			s.Eject = max(s.Eject, a.start-r.FaultStart)
		}
	}
	slices.Sort(lat)
	q := func(f float64) time.Duration {
		if len(lat) == 0 {
			return 0
		}
		return lat[min(len(lat)-1, int(f*float64(len(lat))))]
	}
	s.P50, s.P99 = q(0.5), q(0.99)
	if len(lat) > 0 {
		s.Max = lat[len(lat)-1]
		s.SuccessRate = 100 * float64(s.Requests-s.Failures) / float64(s.Requests)
	}
	if inFault > 0 {
		s.VictimShare = 100 * float64(victimAnswers) / float64(inFault)
	}
	s.Shares = map[string]float64{}
	for p, n := range last {
		s.Shares[p] = 100 * float64(n) / float64(max(lastN, 1))
	}
	return s
}

// goal is one of the goals, checked on the beacon client's run.
type goal struct {
	text string
	met  bool
	got  string
}

func goals(r *run, s summary) []goal {
	if r.Client != "beacon" {
		return nil
	}
	var out []goal
	if r.Scenario != "slow" {
		out = append(out, goal{"0 failed idempotent requests", s.Failures == 0, fmt.Sprintf("%d failed of %d", s.Failures, s.Requests)})
	}
	switch r.Scenario {
	case "hang":
		bound := perTry + hedge
		out = append(out, goal{fmt.Sprintf("p99 below per-try timeout + hedge delay (%v)", bound), s.P99 < bound, fmt.Sprintf("p99 %v", s.P99.Round(100*time.Microsecond))})
	case "slow":
		out = append(out, goal{"most load moved off the slow instance (its share of answers < 10 %; even is 33 %)", s.VictimShare < 10,
			fmt.Sprintf("%.1f %%", s.VictimShare)})
	case "scale-out":
		added := 0.0
		for _, a := range r.Added {
			added += s.Shares[a]
		}
		out = append(out, goal{"the new instances take load (≥ 20 % at the end of the run; even is 40 %)", added >= 20, fmt.Sprintf("%.1f %%", added)})
	}
	return out
}

// errorSummary groups a run's failed calls by error: the three commonest,
// each with its count and when it was first and last seen.
func errorSummary(r *run) string {
	type group struct {
		msg         string
		n           int
		first, last time.Duration
	}
	var groups []*group
	byMsg := map[string]*group{}
	for _, c := range r.Calls {
		if c.err == nil {
			continue
		}
		st := status.Convert(c.err)
		msg := st.Code().String() + ": " + st.Message()
		if len(msg) > 120 {
			msg = msg[:120] + "…"
		}
		g, ok := byMsg[msg]
		if !ok {
			g = &group{msg: msg, first: c.start}
			byMsg[msg] = g
			groups = append(groups, g)
		}
		g.n++
		g.last = c.start
	}
	slices.SortStableFunc(groups, func(a, b *group) int { return b.n - a.n })
	var parts []string
	for _, g := range groups[:min(3, len(groups))] {
		parts = append(parts, fmt.Sprintf("%d × `%s` (%.1f–%.1f s)", g.n, g.msg, g.first.Seconds(), g.last.Seconds()))
	}
	return strings.Join(parts, "; ")
}

func ms(d time.Duration) string {
	if d < 0 {
		return "—"
	}
	return fmt.Sprintf("%.1f ms", float64(d)/1e6)
}

// writeScenario writes a scenario's table (both clients) and its goals.
func writeScenario(w io.Writer, title string, runs []*run) (allMet bool) {
	allMet = true
	fmt.Fprintf(w, "## %s\n\n", title)
	fmt.Fprintln(w, "| client | requests | failures | success | p50 | p99 | max | attempts | time to eject | time to recover | faulty instance's share during the fault |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|---|---|---|")
	var notes []string
	for _, r := range runs {
		s := summarize(r)
		share := "—"
		if r.Victim != "" {
			share = fmt.Sprintf("%.1f %%", s.VictimShare)
		}
		fmt.Fprintf(w, "| %s | %d | %d | %.3f %% | %s | %s | %s | %d | %s | %s | %s |\n", r.Client, s.Requests, s.Failures, s.SuccessRate,
			ms(s.P50), ms(s.P99), ms(s.Max), len(r.Attempts), ms(s.Eject), ms(s.Recover), share)
		if r.Scenario == "scale-out" || r.Scenario == "rolling-restart" {
			var parts []string
			for _, a := range append(append([]string{}, r.OrdersAddrs...), r.Added...) {
				parts = append(parts, fmt.Sprintf("%s %.0f %%", a, s.Shares[a]))
			}
			notes = append(notes, fmt.Sprintf("%s, shares at the end of the run: %s", r.Client, strings.Join(parts, ", ")))
		}
		if e := errorSummary(r); e != "" {
			notes = append(notes, fmt.Sprintf("%s, failures by error: %s", r.Client, e))
		}
		for _, g := range goals(r, s) {
			mark := "met"
			if !g.met {
				mark, allMet = "**NOT MET**", false
			}
			notes = append(notes, fmt.Sprintf("goal (%s client): %s — %s (%s)", r.Client, g.text, mark, g.got))
		}
	}
	fmt.Fprintln(w)
	for _, n := range notes {
		fmt.Fprintf(w, "- %s\n", n)
	}
	fmt.Fprintf(w, "\n![%s](%s.svg)\n\n", title, runs[0].Scenario)
	return allMet
}

// chart draws success rate and p99 latency per 500 ms for every run of a
// scenario, the fault window shaded, as SVG.
func chart(w io.Writer, title string, runs []*run) {
	const width, height, left, panelH, gap, top = 760, 420, 60, 150, 50, 40
	bucket := 500 * time.Millisecond
	var total time.Duration
	for _, r := range runs {
		total = max(total, r.Total)
	}
	n := int(total/bucket) + 1
	x := func(t time.Duration) float64 { return left + float64(width-left-20)*float64(t)/float64(total) }
	type series struct {
		rate, p99 []float64
	}
	var all []series
	maxP99 := 10.0
	for _, r := range runs {
		buckets := make([][]call, n)
		for _, c := range r.Calls {
			i := int(c.start / bucket)
			if i < n {
				buckets[i] = append(buckets[i], c)
			}
		}
		var s series
		for _, b := range buckets {
			if len(b) == 0 {
				s.rate, s.p99 = append(s.rate, -1), append(s.p99, -1)
				continue
			}
			ok := 0
			var lat []time.Duration
			for _, c := range b {
				if c.err == nil {
					ok++
				}
				lat = append(lat, c.latency)
			}
			slices.Sort(lat)
			p := float64(lat[min(len(lat)-1, len(lat)*99/100)]) / 1e6
			s.rate, s.p99 = append(s.rate, 100*float64(ok)/float64(len(b))), append(s.p99, p)
			maxP99 = max(maxP99, p)
		}
		all = append(all, s)
	}
	colors := []string{"#1f6fd1", "#e8731a"}
	fmt.Fprintf(w, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`+"\n", width, height)
	fmt.Fprintf(w, `<rect width="100%%" height="100%%" fill="white"/><text x="%d" y="20" font-size="14" font-weight="bold">%s</text>`+"\n", left, title)
	for _, r := range runs[:1] {
		fmt.Fprintf(w, `<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="#f4d7d7"/>`+"\n", x(r.FaultStart), top, max(x(r.FaultEnd)-x(r.FaultStart), 2), 2*panelH+gap)
	}
	for i, r := range runs {
		if r.ClientRestart > 0 {
			fmt.Fprintf(w, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s" stroke-dasharray="4 3"/><text x="%.1f" y="%d" fill="%s">%s client restarted</text>`+"\n",
				x(r.ClientRestart), top, x(r.ClientRestart), top+2*panelH+gap, colors[i%len(colors)], x(r.ClientRestart)+4, top+panelH+15+15*i, colors[i%len(colors)], r.Client)
		}
	}
	panels := []struct {
		name string
		y0   int
		val  func(series) []float64
		max  float64
		unit string
	}{
		{"success rate", top, func(s series) []float64 { return s.rate }, 100, "%"},
		{"p99 latency", top + panelH + gap, func(s series) []float64 { return s.p99 }, maxP99 * 1.1, "ms"},
	}
	for _, p := range panels {
		fmt.Fprintf(w, `<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#999"/>`+"\n", left, p.y0, width-left-20, panelH)
		fmt.Fprintf(w, `<text x="%d" y="%d">%s</text><text x="5" y="%d">%.0f %s</text><text x="5" y="%d">0</text>`+"\n",
			left+5, p.y0-5, p.name, p.y0+12, p.max, p.unit, p.y0+panelH)
		for i, s := range all {
			var pts []string
			for b, v := range p.val(s) {
				if v < 0 {
					continue
				}
				y := float64(p.y0+panelH) - float64(panelH)*min(v, p.max)/p.max
				pts = append(pts, fmt.Sprintf("%.1f,%.1f", x(time.Duration(b)*bucket+bucket/2), y))
			}
			fmt.Fprintf(w, `<polyline fill="none" stroke="%s" stroke-width="1.5" points="%s"/>`+"\n", colors[i%len(colors)], strings.Join(pts, " "))
		}
	}
	for i, r := range runs {
		fmt.Fprintf(w, `<text x="%d" y="%d" fill="%s">— %s client</text>`+"\n", left+10+i*160, height-10, colors[i%len(colors)], r.Client)
	}
	fmt.Fprintf(w, `<text x="%d" y="%d" fill="#b33">fault shaded; x: %v</text>`+"\n", left+340, height-10, total.Round(time.Second))
	fmt.Fprintln(w, "</svg>")
}
