package proxy

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"time"
)

// accessLog writes one JSON line per request (slog's JSON handler, which
// serialises concurrent writers). A nil *accessLog writes nothing.
type accessLog struct {
	l *slog.Logger
	c io.Closer // the file, or nil for standard output
}

func openAccessLog(path string) (*accessLog, error) {
	switch path {
	case "":
		return nil, nil
	case "-":
		return &accessLog{l: slog.New(slog.NewJSONHandler(os.Stdout, nil))}, nil
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, fmt.Errorf("proxy: accessLog.path: %w", err)
	}
	return &accessLog{l: slog.New(slog.NewJSONHandler(f, nil)), c: f}, nil
}

func (a *accessLog) close() {
	if a != nil && a.c != nil {
		a.c.Close()
	}
}

// accessEntry is what a log line says of a request.
type accessEntry struct {
	remote, method, host, path, proto string
	status                            int
	bytes                             int64
	userAgent                         string
}

// writeRequest logs a request served through net/http.
func (a *accessLog) writeRequest(req *http.Request, rec *recorder, route, service string, start time.Time, st *reqState) {
	if a == nil {
		return
	}
	e := accessEntry{remote: req.RemoteAddr, method: req.Method, host: req.Host, path: req.URL.Path, proto: req.Proto,
		status: rec.status(), bytes: rec.bytes, userAgent: req.UserAgent()}
	attempts := -1
	var err error
	if st != nil {
		attempts, err = int(st.attempts.Load()), st.err
	}
	a.write(&e, route, service, start, attempts, err)
}

// write logs one request; attempts < 0: not sent anywhere.
func (a *accessLog) write(e *accessEntry, route, service string, start time.Time, attempts int, err error) {
	if a == nil {
		return
	}
	attrs := []slog.Attr{
		slog.String("remote", e.remote), slog.String("method", e.method), slog.String("host", e.host),
		slog.String("path", e.path), slog.String("proto", e.proto), slog.Int("status", e.status),
		slog.Int64("bytes", e.bytes), slog.Float64("duration_ms", float64(time.Since(start).Microseconds())/1000),
		slog.String("route", route), slog.String("service", service),
	}
	if attempts >= 0 {
		attrs = append(attrs, slog.Int("attempts", attempts))
		if err != nil {
			attrs = append(attrs, slog.String("error", err.Error()))
		}
	}
	if e.userAgent != "" {
		attrs = append(attrs, slog.String("user_agent", e.userAgent))
	}
	a.l.LogAttrs(context.Background(), slog.LevelInfo, "request", attrs...)
}
