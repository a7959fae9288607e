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

func (a *accessLog) write(req *http.Request, rec *recorder, route, service string, start time.Time, st *reqState) {
	if a == nil {
		return
	}
	attrs := []slog.Attr{
		slog.String("remote", req.RemoteAddr), slog.String("method", req.Method), slog.String("host", req.Host),
		slog.String("path", req.URL.Path), slog.String("proto", req.Proto), slog.Int("status", rec.status()),
		slog.Int64("bytes", rec.bytes), slog.Float64("duration_ms", float64(time.Since(start).Microseconds())/1000),
		slog.String("route", route), slog.String("service", service),
	}
	if st != nil {
		attrs = append(attrs, slog.Int("attempts", int(st.attempts.Load())))
		if st.err != nil {
			attrs = append(attrs, slog.String("error", st.err.Error()))
		}
	}
	if ua := req.UserAgent(); ua != "" {
		attrs = append(attrs, slog.String("user_agent", ua))
	}
	a.l.LogAttrs(context.Background(), slog.LevelInfo, "request", attrs...)
}
