package proxy

import (
	"bufio"
	"bytes"
	"io"
	"net/http"
	"net/http/httputil"
	"slices"
	"strings"
	"testing"
)

// readOne reads the first head of data as the fast path does.
func readOne(data []byte) ([]byte, bool) {
	raw, err := readHead(bufio.NewReaderSize(bytes.NewReader(data), h1BufSize), nil, fastHeadMax)
	return raw, err == nil
}

// A request the fast path serves is one net/http reads the same: every
// head it accepts, http.ReadRequest accepts too, with the same method,
// target, Host, body length and Connection: close. What it does not
// accept goes to net/http, so divergence can only ever be on this side.
func FuzzParseRequest(f *testing.F) {
	for _, s := range []string{
		"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
		"POST /x?y=1 HTTP/1.1\r\nHost: a:80\r\nContent-Length: 3\r\nConnection: close, X-A\r\nX-A: 1\r\n\r\nabc",
		"GET /p%20 HTTP/1.1\r\nHost: a\r\n\r\n",
		"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
		"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: [::1]:8\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		raw, ok := readOne(data)
		if !ok {
			return
		}
		var h requestHead
		if parseRequest(raw, &h) != "" {
			return
		}
		req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(raw)))
		if err != nil {
			t.Fatalf("fast path accepts %q, net/http refuses it: %v", raw, err)
		}
		wantLen := h.contentLength
		if wantLen < 0 {
			wantLen = 0
		}
		switch {
		case req.Method != string(h.method):
			t.Fatalf("%q: method %q, net/http %q", raw, h.method, req.Method)
		case req.RequestURI != string(h.target):
			t.Fatalf("%q: target %q, net/http %q", raw, h.target, req.RequestURI)
		case req.URL.Path != string(h.path):
			t.Fatalf("%q: path %q, net/http %q", raw, h.path, req.URL.Path)
		case req.Host != string(h.host):
			t.Fatalf("%q: host %q, net/http %q", raw, h.host, req.Host)
		case req.ContentLength != wantLen:
			t.Fatalf("%q: length %d, net/http %d", raw, h.contentLength, req.ContentLength)
		case req.Close != h.close:
			t.Fatalf("%q: close %v, net/http %v", raw, h.close, req.Close)
		case len(req.TransferEncoding) > 0:
			t.Fatalf("%q: net/http sees a transfer coding the fast path missed", raw)
		}
	})
}

// A response head the fast path accepts is one http.ReadResponse reads
// the same: status, and how its body ends.
func FuzzParseResponse(f *testing.F) {
	for _, s := range []string{
		"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X\r\n\r\n",
		"HTTP/1.0 404 Not Found\r\nConnection: keep-alive\r\n\r\n",
		"HTTP/1.1 204\r\n\r\n",
		"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
		"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
	} {
		f.Add([]byte(s), false)
	}
	f.Fuzz(func(t *testing.T, data []byte, head bool) {
		raw, ok := readOne(data)
		if !ok {
			return
		}
		var h responseHead
		if parseResponse(raw, &h) != nil {
			return
		}
		method := http.MethodGet
		if head {
			method = http.MethodHead
		}
		resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(raw)), &http.Request{Method: method})
		if err != nil {
			if h.status < 200 && strings.Contains(err.Error(), "status code") {
				return
			}
			t.Fatalf("fast path accepts %q, net/http refuses it: %v", raw, err)
		}
		if resp.StatusCode != h.status {
			t.Fatalf("%q: status %d, net/http %d", raw, h.status, resp.StatusCode)
		}
		kind := h.body(head)
		switch {
		case kind == bodyChunked && !slices.Equal(resp.TransferEncoding, []string{"chunked"}):
			t.Fatalf("%q: chunked, net/http %v", raw, resp.TransferEncoding)
		case kind == bodyLength && resp.ContentLength != h.contentLength:
			t.Fatalf("%q: length %d, net/http %d", raw, h.contentLength, resp.ContentLength)
		case kind == bodyNone && resp.ContentLength > 0 && !head:
			t.Fatalf("%q: no body, net/http expects %d bytes", raw, resp.ContentLength)
		case kind == bodyUntilClose && (resp.ContentLength != -1 || len(resp.TransferEncoding) > 0):
			t.Fatalf("%q: body until close, net/http length %d coding %v", raw, resp.ContentLength, resp.TransferEncoding)
		}
	})
}

// A chunked body copied as it came is one net/http's chunked reader
// decodes to as many bytes as the copy counted, and it is copied whole.
func FuzzCopyChunked(f *testing.F) {
	for _, s := range []string{"3\r\nabc\r\n0\r\n\r\n", "a;ext=1\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n", "0\r\n\r\n", "ffffffffffffffff\r\n"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var out bytes.Buffer
		bw := bufio.NewWriter(&out)
		n, err := copyChunked(bw, bufio.NewReaderSize(bytes.NewReader(data), h1BufSize))
		if err != nil {
			return
		}
		bw.Flush()
		if !bytes.HasPrefix(data, out.Bytes()) {
			t.Fatalf("copy %q is not what came, %q", out.Bytes(), data)
		}
		br := bufio.NewReader(bytes.NewReader(out.Bytes()))
		body, err := io.ReadAll(httputil.NewChunkedReader(br))
		if err != nil {
			t.Fatalf("copied %q, net/http's chunked reader refuses it: %v", out.Bytes(), err)
		}
		if int64(len(body)) != n {
			t.Fatalf("copied %q counting %d bytes, net/http decodes %d", out.Bytes(), n, len(body))
		}
	})
}
