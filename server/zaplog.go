package server

import (
	"context"
	"fmt"
	"log/slog"
	"sync/atomic"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// slogCore sends etcd's zap logs (warnings and errors only) to the server's
// slog logger, and drops them once the server is closing: etcd reports its
// own listeners closing as errors, which is only noise then.
type slogCore struct {
	log     *slog.Logger
	closing *atomic.Bool
	last    *atomic.Pointer[string] // the last warning or error, for start-up errors
	fields  []zapcore.Field
}

func newEtcdLogger(log *slog.Logger, closing *atomic.Bool) (lg *zap.Logger, lastWarning func() string) {
	last := new(atomic.Pointer[string])
	lg = zap.New(slogCore{log: log.With("component", "etcd"), closing: closing, last: last})
	return lg, func() string {
		if p := last.Load(); p != nil {
			return *p
		}
		return ""
	}
}

func (c slogCore) Enabled(l zapcore.Level) bool { return l >= zapcore.WarnLevel }

func (c slogCore) With(fields []zapcore.Field) zapcore.Core {
	c.fields = append(append([]zapcore.Field(nil), c.fields...), fields...)
	return c
}

// benignEtcdWarnings are warnings etcd prints at every start of an embedded
// single-node member configured as beacon configures it.
var benignEtcdWarnings = map[string]bool{
	"Running http and grpc server on single port. This is not recommended for production.": true,
	"simple token is not cryptographically signed":                                         true,
	// The unix socket next to a TLS client listener: it is plain on
	// purpose (only this user can reach it).
	"scheme is http or unix while key and cert files are present; ignoring key and cert files":           true,
	"scheme is http or unix while --client-cert-auth is enabled; ignoring client cert auth for this URL": true,
}

func (c slogCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) && !c.closing.Load() && !benignEtcdWarnings[e.Message] {
		return ce.AddCore(e, c)
	}
	return ce
}

func (c slogCore) Write(e zapcore.Entry, fields []zapcore.Field) error {
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range append(c.fields, fields...) {
		f.AddTo(enc)
	}
	attrs := make([]slog.Attr, 0, len(enc.Fields))
	for k, v := range enc.Fields {
		attrs = append(attrs, slog.Any(k, v))
	}
	msg := e.Message
	if err, ok := enc.Fields["error"]; ok {
		msg = fmt.Sprintf("%s: %v", msg, err)
	}
	c.last.Store(&msg)
	level := slog.LevelWarn
	if e.Level >= zapcore.ErrorLevel {
		level = slog.LevelError
	}
	c.log.LogAttrs(context.Background(), level, e.Message, attrs...)
	return nil
}

func (c slogCore) Sync() error { return nil }
