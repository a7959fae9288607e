package view

// SessionCount returns the live sessions the view knows.
func (v *View) SessionCount() int {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return len(v.sessions)
}

// ServiceCount returns the services of a namespace with at least one
// instance. It walks every service: call it when a service is new, not on
// every write.
func (v *View) ServiceCount(ns string) int {
	v.mu.RLock()
	defer v.mu.RUnlock()
	n := 0
	for sk, s := range v.services {
		if sk.Namespace == ns && len(s.Instances) > 0 {
			n++
		}
	}
	return n
}
