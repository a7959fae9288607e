// Command goproxy is the edge-proxy benchmark's Go floor: net/http's
// httputil.ReverseProxy with pooled buffers, round robin over fixed
// backends, no discovery, retries or metrics. beacon proxy beside it shows
// what beacon's data plane costs; nginx beside it, what Go's HTTP stack
// costs.
package main

import (
	"flag"
	"log"
	"net/http"
	"net/http/httputil"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type pool struct{ p sync.Pool }

func (b *pool) Get() []byte {
	if v, ok := b.p.Get().(*[]byte); ok {
		return *v
	}
	return make([]byte, 32<<10)
}

func (b *pool) Put(buf []byte) { b.p.Put(&buf) }

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "listen address")
	backends := flag.String("backends", "", "backend host:port list, comma-separated")
	flag.Parse()
	hosts := strings.Split(*backends, ",")
	var next atomic.Uint64
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = 100
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetXForwarded()
			pr.Out.URL.Scheme = "http"
			pr.Out.URL.Host = hosts[next.Add(1)%uint64(len(hosts))]
		},
		Transport:  tr,
		BufferPool: &pool{},
	}
	srv := &http.Server{Addr: *addr, Handler: rp, ReadHeaderTimeout: 10 * time.Second}
	log.Fatal(srv.ListenAndServe())
}
