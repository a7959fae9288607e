package audit

// BreakFile closes l's file under it, so that the next write fails as it
// would on a descriptor gone bad.
func BreakFile(l *Log) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.f.Close()
}
