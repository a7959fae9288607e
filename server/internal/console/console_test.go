package console_test

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"beacon.dev/beacon/server/internal/console"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const wantCSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; " +
	"img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

func do(t *testing.T, method, path string, header http.Header) *http.Response {
	t.Helper()
	req := httptest.NewRequest(method, path, nil)
	for k, v := range header {
		req.Header[k] = v
	}
	rec := httptest.NewRecorder()
	console.Handler().ServeHTTP(rec, req)
	return rec.Result()
}

func body(t *testing.T, resp *http.Response) string {
	t.Helper()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func checkSecurityHeaders(t *testing.T, what string, resp *http.Response) {
	t.Helper()
	for k, want := range map[string]string{
		"Content-Security-Policy": wantCSP,
		"X-Content-Type-Options":  "nosniff",
		"Referrer-Policy":         "no-referrer",
	} {
		if got := resp.Header.Get(k); got != want {
			t.Errorf("%s: %s = %q, want %q", what, k, got, want)
		}
	}
}

func TestAssets(t *testing.T) {
	for _, tt := range []struct {
		path, ctype, contains string
	}{
		{"/", "text/html; charset=utf-8", `<script src="/ui/app.js" defer></script>`},
		{"/ui/", "text/html; charset=utf-8", `<div id="error"`},
		{"/ui/app.js", "text/javascript; charset=utf-8", "function api(service, method, body"},
		{"/ui/style.css", "text/css; charset=utf-8", "#error"},
	} {
		resp := do(t, "GET", tt.path, nil)
		b := body(t, resp)
		if resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s: status %d, want 200", tt.path, resp.StatusCode)
			continue
		}
		if got := resp.Header.Get("Content-Type"); got != tt.ctype {
			t.Errorf("GET %s: Content-Type %q, want %q", tt.path, got, tt.ctype)
		}
		if got := resp.Header.Get("Cache-Control"); got != "no-cache" {
			t.Errorf("GET %s: Cache-Control %q, want no-cache", tt.path, got)
		}
		if !strings.Contains(b, tt.contains) {
			t.Errorf("GET %s: body lacks %q", tt.path, tt.contains)
		}
		checkSecurityHeaders(t, "GET "+tt.path, resp)
	}
}

func TestETag(t *testing.T) {
	etags := map[string]string{}
	for _, p := range []string{"/", "/ui/", "/ui/app.js", "/ui/style.css"} {
		resp := do(t, "GET", p, nil)
		etag := resp.Header.Get("ETag")
		if len(etag) < 10 || !strings.HasPrefix(etag, `"`) || !strings.HasSuffix(etag, `"`) {
			t.Fatalf("GET %s: ETag %q, want a strong quoted tag", p, etag)
		}
		etags[p] = etag
		again := do(t, "GET", p, nil)
		if got := again.Header.Get("ETag"); got != etag {
			t.Errorf("GET %s twice: ETag %q then %q, want the same", p, etag, got)
		}
		resp = do(t, "GET", p, http.Header{"If-None-Match": {etag}})
		if resp.StatusCode != http.StatusNotModified {
			t.Errorf("GET %s with If-None-Match: status %d, want 304", p, resp.StatusCode)
		}
		if b := body(t, resp); b != "" {
			t.Errorf("GET %s with If-None-Match: body %d bytes, want none", p, len(b))
		}
		checkSecurityHeaders(t, "304 "+p, resp)
		resp = do(t, "GET", p, http.Header{"If-None-Match": {`"stale"`}})
		if resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s with a stale If-None-Match: status %d, want 200", p, resp.StatusCode)
		}
	}
	if etags["/"] != etags["/ui/"] {
		t.Errorf("ETag of / %s and of /ui/ %s differ, want the same (both index.html)", etags["/"], etags["/ui/"])
	}
	if etags["/"] == etags["/ui/app.js"] || etags["/ui/app.js"] == etags["/ui/style.css"] {
		t.Errorf("ETags %v: want one per asset", etags)
	}
}

func TestHead(t *testing.T) {
	get := do(t, "GET", "/ui/app.js", nil)
	head := do(t, "HEAD", "/ui/app.js", nil)
	if head.StatusCode != http.StatusOK {
		t.Fatalf("HEAD /ui/app.js: status %d, want 200", head.StatusCode)
	}
	if b := body(t, head); b != "" {
		t.Errorf("HEAD /ui/app.js: body %d bytes, want none", len(b))
	}
	if head.Header.Get("ETag") != get.Header.Get("ETag") || head.Header.Get("Content-Length") != get.Header.Get("Content-Length") {
		t.Errorf("HEAD headers %v, want those of GET %v", head.Header, get.Header)
	}
}

func TestNotFound(t *testing.T) {
	for _, p := range []string{"/ui/nope.js", "/ui/assets/app.js", "/ui/index.html", "/ui/app.js/", "/favicon.ico", "/assets/app.js"} {
		resp := do(t, "GET", p, nil)
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("GET %s: status %d, want 404", p, resp.StatusCode)
		}
		checkSecurityHeaders(t, "404 "+p, resp)
	}
	resp := do(t, "GET", "/ui", nil)
	if resp.StatusCode != http.StatusMovedPermanently || resp.Header.Get("Location") != "/ui/" {
		t.Errorf("GET /ui: status %d Location %q, want 301 to /ui/", resp.StatusCode, resp.Header.Get("Location"))
	}
}

func TestMethodNotAllowed(t *testing.T) {
	for _, m := range []string{"POST", "PUT", "DELETE", "OPTIONS"} {
		resp := do(t, m, "/ui/app.js", nil)
		if resp.StatusCode != http.StatusMethodNotAllowed {
			t.Errorf("%s /ui/app.js: status %d, want 405", m, resp.StatusCode)
		}
		if got := resp.Header.Get("Allow"); got != "GET, HEAD" {
			t.Errorf("%s /ui/app.js: Allow %q, want \"GET, HEAD\"", m, got)
		}
		checkSecurityHeaders(t, "405 "+m, resp)
	}
}

// TestNoInlineCode keeps the assets within the CSP: no inline scripts,
// style attributes or handlers in the markup, nothing fetched from
// elsewhere, and server data written as text, never parsed as markup.
func TestNoInlineCode(t *testing.T) {
	html := body(t, do(t, "GET", "/", nil))
	js := body(t, do(t, "GET", "/ui/app.js", nil))
	css := body(t, do(t, "GET", "/ui/style.css", nil))
	for _, bad := range []string{"style=", "<style", "onclick=", "onload=", "javascript:", "http://", "https://", "<script>"} {
		if strings.Contains(html, bad) {
			t.Errorf("index.html contains %q", bad)
		}
	}
	for _, bad := range []string{"innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", "localStorage", "document.cookie", "http://", "https://"} {
		if strings.Contains(js, bad) {
			t.Errorf("app.js contains %q", bad)
		}
	}
	for _, bad := range []string{"@import", "url(http"} {
		if strings.Contains(css, bad) {
			t.Errorf("style.css contains %q", bad)
		}
	}
}

func TestSize(t *testing.T) {
	sum := 0
	for _, p := range []string{"/", "/ui/app.js", "/ui/style.css"} {
		sum += len(body(t, do(t, "GET", p, nil)))
	}
	if got := console.Size(); got != sum {
		t.Errorf("Size() = %d, want %d (the three assets)", got, sum)
	}
	if got := console.Size(); got > 60<<10 {
		t.Errorf("Size() = %d, want at most 60 KiB (the console's budget)", got)
	}
}
