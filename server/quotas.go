package server

import (
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// tokenQuotas are the per-token limits of this server (Limits.*PerToken):
// write rate and open watch streams by token accessor. The maps hold one
// entry per token that wrote or watched, at most as many as there are
// tokens (acl.MaxTokens) and roles; an entry whose bucket is full and
// that holds no watcher is dropped when the map is pruned.
type tokenQuotas struct {
	lim Limits

	mu       sync.Mutex
	writes   map[string]*rate.Limiter // guarded by mu
	watchers map[string]int           // guarded by mu
}

func newTokenQuotas(lim Limits) *tokenQuotas {
	return &tokenQuotas{lim: lim, writes: map[string]*rate.Limiter{}, watchers: map[string]int{}}
}

// pruneAt is the size at which the write buckets are pruned.
const pruneAt = 4096

// allowWrite spends n writes of the token's budget.
func (q *tokenQuotas) allowWrite(accessor string, n int) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	l := q.writes[accessor]
	if l == nil {
		if len(q.writes) >= pruneAt {
			for acc, w := range q.writes {
				if w.Tokens() >= float64(w.Burst()) {
					delete(q.writes, acc)
				}
			}
		}
		l = rate.NewLimiter(rate.Limit(q.lim.WriteRatePerToken), q.lim.WriteBurstPerToken)
		q.writes[accessor] = l
	}
	return l.AllowN(time.Now(), n)
}

// takeWatcher counts one more watch stream of the token, if under its
// limit; releaseWatcher gives it back.
func (q *tokenQuotas) takeWatcher(accessor string) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.watchers[accessor] >= q.lim.MaxWatchersPerToken {
		return false
	}
	q.watchers[accessor]++
	return true
}

func (q *tokenQuotas) releaseWatcher(accessor string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.watchers[accessor]--; q.watchers[accessor] <= 0 {
		delete(q.watchers, accessor)
	}
}
