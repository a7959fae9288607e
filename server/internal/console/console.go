package console

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"io/fs"
	"net/http"
	"time"
)

//go:embed assets
var assetFS embed.FS

// Headers every answer carries, errors included. The policy allows only
// the console's own script, stylesheet and API: no inline script or style
// (the application sets no style attributes from markup), no framing.
var securityHeaders = map[string]string{
	"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; " +
		"img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
	"X-Content-Type-Options": "nosniff",
	"Referrer-Policy":        "no-referrer",
}

// asset is one embedded file, ready to serve.
type asset struct {
	body  []byte
	ctype string
	etag  string // strong, from the content's hash
}

// byPath maps request paths to assets; filled once at init and only read
// afterwards.
var byPath map[string]*asset

var totalSize int

func init() {
	load := func(name, ctype string) *asset {
		b, err := fs.ReadFile(assetFS, "assets/"+name)
		if err != nil {
			panic("console: embedded asset missing: " + name) // a build mistake, caught by the tests
		}
		sum := sha256.Sum256(b)
		return &asset{body: b, ctype: ctype, etag: `"` + hex.EncodeToString(sum[:12]) + `"`}
	}
	index := load("index.html", "text/html; charset=utf-8")
	byPath = map[string]*asset{
		"/":             index,
		"/ui/":          index,
		"/ui/app.js":    load("app.js", "text/javascript; charset=utf-8"),
		"/ui/style.css": load("style.css", "text/css; charset=utf-8"),
	}
	_ = fs.WalkDir(assetFS, "assets", func(_ string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if info, err := d.Info(); err == nil {
				totalSize += int(info.Size())
			}
		}
		return nil
	})
}

// Size returns the total bytes of the embedded assets (uncompressed).
func Size() int { return totalSize }

// Handler serves the console: index.html at / and /ui/, app.js and
// style.css under /ui/, 404 for any other path and 405 for methods other
// than GET and HEAD. Answers are revalidated on every load (no-cache with
// an ETag), so that a new server build is picked up at once while an
// unchanged one costs a 304.
func Handler() http.Handler { return http.HandlerFunc(serve) }

func serve(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	for k, v := range securityHeaders {
		h.Set(k, v)
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		h.Set("Allow", "GET, HEAD")
		http.Error(w, "console: method not allowed", http.StatusMethodNotAllowed)
		return
	}
	if r.URL.Path == "/ui" {
		http.Redirect(w, r, "/ui/", http.StatusMovedPermanently)
		return
	}
	a := byPath[r.URL.Path]
	if a == nil {
		http.Error(w, "console: not found", http.StatusNotFound)
		return
	}
	h.Set("Content-Type", a.ctype)
	h.Set("ETag", a.etag)
	h.Set("Cache-Control", "no-cache")
	// ServeContent answers If-None-Match with 304, HEAD without a body,
	// and ranges; a zero modtime sends no Last-Modified.
	http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(a.body))
}
