package proxy

import (
	"bufio"
	"bytes"
	"errors"
)

// The HTTP/1.1 fast path's parsing (docs/proxy.md, "The HTTP/1.1 fast
// path"). It is deliberately narrow: a request it does not fully
// understand is not rejected here but handed, with its connection, to
// Go's net/http server, whose parser answers it (or refuses it) as before.
// So every check below errs towards handing off, never towards guessing.

// header is one header line of a head: slices of the head's own bytes.
type header struct {
	name, value []byte // value trimmed of spaces and tabs
	line        []byte // the whole line, CRLF included
}

// headerIs reports whether name equals lower (lower case ASCII),
// ignoring case.
func headerIs(name []byte, lower string) bool {
	if len(name) != len(lower) {
		return false
	}
	for i, c := range name {
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != lower[i] {
			return false
		}
	}
	return true
}

// errHeadTooLarge: the head did not end within the bound.
var errHeadTooLarge = errors.New("head over the size bound")

// readHead appends the next head (the start line and the header lines, up
// to and including the empty line) from br to dst. It reads at most max
// bytes; past that it returns errHeadTooLarge with what it read.
func readHead(br *bufio.Reader, dst []byte, max int) ([]byte, error) {
	start := len(dst)
	lineStart := start
	for {
		chunk, err := br.ReadSlice('\n')
		dst = append(dst, chunk...)
		if len(dst)-start > max {
			return dst, errHeadTooLarge
		}
		switch {
		case err == bufio.ErrBufferFull:
			continue // a long line: the rest follows
		case err != nil:
			return dst, err
		}
		line := dst[lineStart:]
		lineStart = len(dst)
		if len(line) <= 2 && lineStart-len(line) > start { // the empty line after the start line
			return dst, nil
		}
	}
}

// tokenChar is RFC 9110's tchar: what a method or header name is made of.
var tokenChar = alnumAnd("!#$&'*+-.^_`|~%")

// alnumAnd is a byte table of the ASCII letters and digits and extra.
func alnumAnd(extra string) (t [256]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c], t[c-'a'+'A'] = true, true
	}
	for _, c := range extra {
		t[c] = true
	}
	return t
}

// splitLines calls f with each line of head, CRLF included, and reports
// false if a line does not end in CRLF or holds another CR or a NUL.
func splitLines(head []byte, f func(line []byte) bool) bool {
	for len(head) > 0 {
		i := bytes.IndexByte(head, '\n')
		if i < 1 || head[i-1] != '\r' {
			return false
		}
		line := head[:i+1]
		if bytes.IndexByte(line[:i-1], '\r') >= 0 || bytes.IndexByte(line, 0) >= 0 {
			return false
		}
		if !f(line) {
			return false
		}
		head = head[i+1:]
	}
	return true
}

// parseHeader splits a header line; false for anything but "name: value"
// with a token name and a value free of control bytes but tab.
func parseHeader(line []byte) (header, bool) {
	body := line[:len(line)-2]
	colon := bytes.IndexByte(body, ':')
	if colon < 1 {
		return header{}, false // obs-fold (a leading space) has no name either
	}
	name := body[:colon]
	for _, c := range name {
		if !tokenChar[c] {
			return header{}, false
		}
	}
	value := bytes.Trim(body[colon+1:], " \t")
	for _, c := range value {
		if c < ' ' && c != '\t' || c == 0x7f {
			return header{}, false
		}
	}
	return header{name: name, value: value, line: line}, true
}

// requestHead is a parsed request head the fast path serves.
type requestHead struct {
	method, target, path []byte // path: target up to '?'
	host                 []byte
	contentLength        int64
	close                bool // Connection: close
	idempotencyKey       bool // a non-empty Idempotency-Key
	teTrailers           bool // TE names trailers
	userAgent            []byte
	headers              []header
	hop                  [][]byte // headers the Connection header names
}

// Hand-off reasons, a bounded set for beacon_proxy_handoffs_total.
const (
	handoffMalformed = "malformed"         // net/http answers 400
	handoffVersion   = "version"           // not HTTP/1.1 (HTTP/1.0, h2c prior knowledge)
	handoffTarget    = "target"            // not a plain origin-form path: absolute form, *, percent-encoded
	handoffUpgrade   = "upgrade"           // Upgrade (websockets, h2c)
	handoffExpect    = "expect"            // Expect: 100-continue
	handoffChunked   = "transfer-encoding" // a request body without a length
	handoffBodySize  = "body-size"         // over fastBodyMax: streamed by net/http
	handoffHeadSize  = "head-size"         // over the listener's maxHeaderBytes or the fast path's bound
	handoffRoute     = "route"             // the route hedges, speaks TLS upstream, or requests are traced
)

// parseRequest parses a whole request head into h (reusing its slices).
// It returns "" when the fast path can serve the request, or the reason
// to hand it to net/http.
func parseRequest(head []byte, h *requestHead) string {
	*h = requestHead{headers: h.headers[:0], hop: h.hop[:0], contentLength: -1}
	first := true
	hosts, lengths := 0, 0
	seenKey := false
	ok := splitLines(head, func(line []byte) bool {
		if first {
			first = false
			return h.requestLine(line[:len(line)-2])
		}
		if len(line) == 2 { // the end of the head
			return true
		}
		hd, ok := parseHeader(line)
		if !ok {
			return false
		}
		h.headers = append(h.headers, hd)
		switch {
		case headerIs(hd.name, "host"):
			hosts++
			h.host = hd.value
		case headerIs(hd.name, "content-length"):
			lengths++
			n, ok := parseLength(hd.value)
			if !ok {
				return false
			}
			h.contentLength = n
		case headerIs(hd.name, "connection"):
			for tok := range bytes.SplitSeq(hd.value, []byte(",")) {
				tok = bytes.Trim(tok, " \t")
				switch {
				case headerIs(tok, "close"):
					h.close = true
				case len(tok) > 0:
					h.hop = append(h.hop, tok)
				}
			}
		case headerIs(hd.name, "idempotency-key"):
			if !seenKey { // the first, as Header.Get
				seenKey, h.idempotencyKey = true, len(hd.value) > 0
			}
		case headerIs(hd.name, "te"):
			for tok := range bytes.SplitSeq(hd.value, []byte(",")) {
				if tok = bytes.Trim(tok, " \t"); headerIs(tok, "trailers") || bytes.HasPrefix(bytes.ToLower(tok), []byte("trailers;")) {
					h.teTrailers = true
				}
			}
		case headerIs(hd.name, "user-agent"):
			h.userAgent = hd.value
		}
		return true
	})
	if !ok || first || hosts != 1 || lengths > 1 || !validHost(h.host) {
		if h.method != nil && !bytes.Equal(h.proto(head), []byte("HTTP/1.1")) {
			return handoffVersion
		}
		return handoffMalformed
	}
	for _, hd := range h.headers {
		switch {
		case headerIs(hd.name, "transfer-encoding"):
			return handoffChunked
		case headerIs(hd.name, "upgrade"):
			return handoffUpgrade
		case headerIs(hd.name, "expect"):
			return handoffExpect
		}
	}
	for _, tok := range h.hop {
		switch {
		case headerIs(tok, "upgrade"):
			return handoffUpgrade
		case framingHeader(tok):
			// Connection naming a header that frames or routes the
			// request: dropping it would change what the instance reads
			// (a request smuggled in a body).
			return handoffMalformed
		}
	}
	if h.target == nil || string(h.method) == "CONNECT" {
		return handoffTarget
	}
	return ""
}

// framingHeader: headers a Connection header may not name on the fast
// path (net/http's transport writes its own Host and length instead).
func framingHeader(name []byte) bool {
	return headerIs(name, "content-length") || headerIs(name, "transfer-encoding") || headerIs(name, "host")
}

// proto is the start line's last word (for the reason of a hand-off).
func (h *requestHead) proto(head []byte) []byte {
	end := bytes.IndexByte(head, '\r')
	if end < 0 {
		return nil
	}
	line := head[:end]
	return line[bytes.LastIndexByte(line, ' ')+1:]
}

// requestLine parses "METHOD SP target SP HTTP/1.1". A target the fast
// path does not take (not a path, or a percent-encoded one, which route
// matching would have to decode) leaves h.target nil.
func (h *requestHead) requestLine(line []byte) bool {
	sp1 := bytes.IndexByte(line, ' ')
	if sp1 < 1 {
		return false
	}
	rest := line[sp1+1:]
	sp2 := bytes.IndexByte(rest, ' ')
	if sp2 < 1 {
		return false
	}
	h.method = line[:sp1]
	for _, c := range h.method {
		if !tokenChar[c] {
			return false
		}
	}
	if !bytes.Equal(rest[sp2+1:], []byte("HTTP/1.1")) {
		return false
	}
	target := rest[:sp2]
	if target[0] != '/' || bytes.HasPrefix(target, []byte("//")) {
		return true // absolute form, *, authority form: net/http's
	}
	for _, c := range target {
		if c <= ' ' || c >= 0x7f || c == '#' {
			return false
		}
	}
	path, query := target, []byte(nil)
	if q := bytes.IndexByte(target, '?'); q >= 0 {
		path, query = target[:q], target[q+1:]
	}
	for _, c := range path {
		if !pathChar[c] {
			return true // percent-encoded, or what net/http would escape: its to send
		}
	}
	if !plainQuery(query) {
		return true
	}
	h.target, h.path = target, path
	return true
}

// pathChar: what a path is sent as by net/http unchanged (RFC 3986's
// unreserved and sub-delims, ':', '@' and '/'); '%' is not: a
// percent-encoded path is matched on its decoded form, net/http's.
var pathChar = alnumAnd("-._~!$&'()*+,;=:@/")

// plainQuery reports whether httputil.ReverseProxy would send q as it is:
// no ';' and every '%' a valid escape (otherwise it re-encodes the query,
// so that the proxy and the instance cannot read the parameters apart).
func plainQuery(q []byte) bool {
	if bytes.Count(q, []byte("&")) >= 10000 { // net/http's bound on parameters
		return false
	}
	for i := 0; i < len(q); i++ {
		switch q[i] {
		case ';':
			return false
		case '%':
			if i+2 >= len(q) || !isHex(q[i+1]) || !isHex(q[i+2]) {
				return false
			}
			i += 2
		}
	}
	return true
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// parseLength parses a Content-Length: digits only, at most 18 of them.
func parseLength(v []byte) (int64, bool) {
	if len(v) == 0 || len(v) > 18 {
		return 0, false
	}
	var n int64
	for _, c := range v {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	return n, true
}

// validHost accepts a host name or address with an optional port, in the
// characters those are made of; anything else is net/http's to judge.
func validHost(h []byte) bool {
	if len(h) == 0 {
		return false
	}
	for _, c := range h {
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case c == '.', c == '-', c == ':', c == '[', c == ']', c == '_':
		default:
			return false
		}
	}
	return true
}

// hopByHop reports whether a header belongs to one connection and is not
// forwarded (RFC 9110 §7.6.1, and what httputil.ReverseProxy drops),
// either by name or because the Connection header names it. In a request
// (request true) the X-Forwarded-* and Forwarded headers are dropped too:
// the proxy sets its own, as ReverseProxy's Rewrite mode does, so a
// client cannot forge them.
func hopByHop(name []byte, named [][]byte, request bool) bool {
	switch len(name) {
	case 2:
		if headerIs(name, "te") {
			return true
		}
	case 7:
		if headerIs(name, "trailer") || headerIs(name, "upgrade") {
			return true
		}
	case 9:
		if request && headerIs(name, "forwarded") {
			return true
		}
	case 10:
		if headerIs(name, "connection") || headerIs(name, "keep-alive") {
			return true
		}
	case 15:
		if request && headerIs(name, "x-forwarded-for") {
			return true
		}
	case 16:
		if headerIs(name, "proxy-connection") || request && headerIs(name, "x-forwarded-host") {
			return true
		}
	case 17:
		if headerIs(name, "transfer-encoding") || request && headerIs(name, "x-forwarded-proto") {
			return true
		}
	case 18:
		if headerIs(name, "proxy-authenticate") {
			return true
		}
	case 19:
		if headerIs(name, "proxy-authorization") {
			return true
		}
	}
	for _, n := range named {
		if bytes.EqualFold(n, name) {
			return true
		}
	}
	return false
}

// responseHead is a parsed response head from an instance.
type responseHead struct {
	status        int
	statusLine    []byte // CRLF included
	contentLength int64  // -1: none
	chunked       bool
	close         bool // the instance closes the connection after it
	headers       []header
	hop           [][]byte
}

// bodyKind is how a response's body is delimited.
type bodyKind int

const (
	bodyNone bodyKind = iota
	bodyLength
	bodyChunked
	bodyUntilClose
)

var errBadResponse = errors.New("malformed response head from the instance")

// parseResponse parses a response head (reusing h's slices).
func parseResponse(head []byte, h *responseHead) error {
	*h = responseHead{headers: h.headers[:0], hop: h.hop[:0], contentLength: -1}
	first := true
	http10 := false
	keepAlive := false
	ok := splitLines(head, func(line []byte) bool {
		if first {
			first = false
			h.statusLine = line
			l := line[:len(line)-2]
			if len(l) < 12 || l[8] != ' ' || (len(l) > 12 && l[12] != ' ') {
				return false
			}
			switch string(l[:8]) {
			case "HTTP/1.1":
			case "HTTP/1.0":
				http10 = true
			default:
				return false
			}
			code := 0
			for _, c := range l[9:12] {
				if c < '0' || c > '9' {
					return false
				}
				code = code*10 + int(c-'0')
			}
			h.status = code
			return code >= 100
		}
		if len(line) == 2 {
			return true
		}
		hd, ok := parseHeader(line)
		if !ok {
			return false
		}
		h.headers = append(h.headers, hd)
		switch {
		case headerIs(hd.name, "content-length"):
			n, ok := parseLength(hd.value)
			if !ok || (h.contentLength >= 0 && h.contentLength != n) {
				return false
			}
			h.contentLength = n
		case headerIs(hd.name, "transfer-encoding"):
			if !headerIs(hd.value, "chunked") || h.chunked {
				return false // other codings: none an instance of a beacon service sends
			}
			h.chunked = true
		case headerIs(hd.name, "connection"):
			for tok := range bytes.SplitSeq(hd.value, []byte(",")) {
				tok = bytes.Trim(tok, " \t")
				switch {
				case headerIs(tok, "close"):
					h.close = true
				case headerIs(tok, "keep-alive"):
					keepAlive = true
				case framingHeader(tok):
					return false // dropping it would unframe the body
				case len(tok) > 0:
					h.hop = append(h.hop, tok)
				}
			}
		}
		return true
	})
	if !ok || first {
		return errBadResponse
	}
	if h.chunked && h.contentLength >= 0 {
		return errBadResponse // RFC 9112 §6.3: a sender must not; a smuggling vector
	}
	if http10 && h.chunked {
		return errBadResponse // net/http ignores a coding HTTP/1.0 does not have; nobody should send it
	}
	if http10 && !keepAlive {
		h.close = true
	}
	return nil
}

// body says how the response's body is delimited; a HEAD request's
// response, 1xx, 204 and 304 have none.
func (h *responseHead) body(head bool) bodyKind {
	switch {
	case head, h.status < 200, h.status == 204, h.status == 304:
		return bodyNone
	case h.chunked:
		return bodyChunked
	case h.contentLength == 0:
		return bodyNone
	case h.contentLength > 0:
		return bodyLength
	}
	return bodyUntilClose
}
