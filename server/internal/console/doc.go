// Package console is the beacon web console's front end: a single-page
// application (index.html, app.js, style.css, vanilla JavaScript, nothing
// loaded from elsewhere) embedded in the binary, and the handler that
// serves it.
//
// The application routes with the URL's fragment (#/services,
// #/services/default/orders, #/kv/default/shop/pricing), so the handler
// needs no route table: it serves index.html at / and /ui/ and the two
// other assets under /ui/. The pages call the public API on the same
// origin (the Connect protocol's JSON form and the /v1/watch NDJSON
// stream); package server mounts both on the console's port.
//
// Every answer carries a strict Content-Security-Policy (scripts, styles
// and connections from the console's own origin only, no framing), and
// the application writes server data into the page only as text, never
// as markup: instance metadata, check output and KV values are written by
// whoever registers or configures, not by the operator reading them.
//
// Handler's http.Handler is safe for concurrent use.
package console
