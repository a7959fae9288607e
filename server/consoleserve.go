package server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"

	"beacon.dev/beacon/server/internal/console"
)

// The web console (docs/console.md): its own port, serving the console's
// assets and, on the same origin, the whole public API behind the same
// guard, limits, ACLs and audit as --addr. The console is a client of the
// API like any other: it can do exactly what the token it logs in with
// may do.

// ConsoleAuto asks for the console on --addr's host, its port + 3
// (DefaultConsoleAddr for the default --addr), when --addr is a loopback
// address: a console reachable from other machines is opened only when
// asked for by address. When that port is taken the server starts
// without a console and says so.
const ConsoleAuto = "auto"

// A console serves a few operators' browsers: its own small connection
// limits, so that it cannot take the API's share of file descriptors.
const (
	maxConsoleConns      = 256
	maxConsoleConnsPerIP = 64
)

// DefaultConsoleAddr is where `beacon server` serves the console by default.
const DefaultConsoleAddr = "127.0.0.1:8973"

// consoleAddr resolves ConsoleAddr: "" or "off" is no console.
func (c *Config) consoleAddr() (addr string, auto bool, err error) {
	switch c.ConsoleAddr {
	case "", "off":
		return "", false, nil
	case ConsoleAuto:
		host, portText, err := net.SplitHostPort(c.Addr)
		if err != nil {
			return "", false, fmt.Errorf("server: invalid --addr %q: %w", c.Addr, err)
		}
		port, err := strconv.Atoi(portText)
		if err != nil || port == 0 || port+3 > 65535 || !loopback(c.Addr) {
			// A random or top port: no place to derive one from. Beyond
			// loopback: only where asked.
			return "", true, nil
		}
		return net.JoinHostPort(host, strconv.Itoa(port+3)), true, nil
	}
	if _, _, err := net.SplitHostPort(c.ConsoleAddr); err != nil {
		return "", false, fmt.Errorf("server: invalid --console-addr %q: %w (or \"auto\", \"off\")", c.ConsoleAddr, err)
	}
	return c.ConsoleAddr, false, nil
}

func (c *Config) validateConsole() error {
	addr, _, err := c.consoleAddr()
	if err != nil || addr == "" {
		return err
	}
	if !c.Insecure && !loopback(addr) && (c.TLSCertFile == "" || !c.ACL) {
		return fmt.Errorf("server: --console-addr %s is reachable beyond this machine: serve it with --tls-cert and --tls-key (it uses the API's) and turn on --acl, or give --insecure (docs/security.md)", addr)
	}
	return nil
}

// startConsole binds the console's listener, behind the same connection
// limits as the API's, and serves it. An address derived by "auto" that
// is taken is not an error: the server runs without a console.
func (s *Server) startConsole() error {
	addr, auto, err := s.cfg.consoleAddr()
	if err != nil || addr == "" {
		return err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		if auto {
			s.log.Warn("web console off: its port is taken (set --console-addr)", "addr", addr, "err", err)
			return nil
		}
		return fmt.Errorf("server: listening on --console-addr %s: %w", addr, err)
	}
	lim := s.cfg.Limits
	s.consoleLn = newConnLimiter(ln, min(lim.effectiveMaxConns(), maxConsoleConns), min(lim.MaxConnsPerIP, maxConsoleConnsPerIP), s.conns.newWrites, func(limit string) {
		s.metrics.limitHits.WithLabelValues(limit).Inc()
	})
	s.consoleSrv = s.newHTTPServer(consoleRoutes(console.Handler(), s.httpSrv.Handler, loopback(addr)))
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := s.consoleSrv.Serve(s.tlsListener(s.consoleLn)); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.fail(fmt.Errorf("server: serving --console-addr %s: %w", addr, err))
		}
	}()
	s.log.Info("web console", "url", s.ConsoleURL())
	return nil
}

// consoleRoutes sends / and /ui/ to the console's assets and every other
// path to the API. On a loopback address it answers only requests for a
// loopback host: a web page whose name an attacker points at 127.0.0.1
// (DNS rebinding) would otherwise be same-origin with the console, and
// with ACLs off could call the API from the operator's browser.
func consoleRoutes(ui, api http.Handler, loopbackOnly bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if loopbackOnly && !loopbackHost(r.Host) {
			http.Error(w, fmt.Sprintf("console: host %.64q is not this machine's loopback address (use http://127.0.0.1 or http://localhost)", r.Host), http.StatusMisdirectedRequest)
			return
		}
		if r.URL.Path == "/" || strings.HasPrefix(r.URL.Path, "/ui/") || r.URL.Path == "/ui" {
			ui.ServeHTTP(w, r)
			return
		}
		api.ServeHTTP(w, r)
	})
}

// loopbackHost reports whether a Host header names the loopback interface.
func loopbackHost(hostport string) bool {
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(strings.Trim(host, "[]"))
	return ip != nil && ip.IsLoopback()
}

// ConsoleAddr returns the address the web console listens on ("" when off).
func (s *Server) ConsoleAddr() string {
	if s.consoleLn == nil {
		return ""
	}
	return s.consoleLn.Addr().String()
}

// ConsoleURL returns the web console's URL ("" when off).
func (s *Server) ConsoleURL() string {
	if s.consoleLn == nil {
		return ""
	}
	scheme := "http"
	if s.tlsConfig != nil {
		scheme = "https"
	}
	return scheme + "://" + s.ConsoleAddr() + "/"
}

func (s *Server) stopConsole(ctx context.Context) {
	if s.consoleSrv == nil {
		return
	}
	if ctx == nil {
		s.consoleSrv.Close()
		return
	}
	if err := s.consoleSrv.Shutdown(ctx); err != nil {
		s.consoleSrv.Close()
	}
}
