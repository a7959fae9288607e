// The beacon console: a single-page application over the public API on
// the same origin (Connect's JSON form, POST /beacon.v1.<Service>/<Method>,
// and the /v1/watch NDJSON stream). Routes live in the URL's fragment.
//
// Server data reaches the page only as text: h() appends strings as text
// nodes and never parses markup, because instance metadata, check output
// and KV values are written by whoever registers or configures.
'use strict';

const TOKEN_KEY = 'beacon.token';
const NS_KEY = 'beacon.ns';

const S = {
  // The ACL token: in sessionStorage only, gone with the tab (never a
  // cookie, never persistent storage).
  token: sessionStorage.getItem(TOKEN_KEY) || '',
  ns: sessionStorage.getItem(NS_KEY) || 'default',
  who: null, // WhoAmIResponse once known
  aclEnabled: null, // null: not known yet
  view: null, // the AbortController of the page shown
  loginNote: '', // why the last token was dropped, for the login page
  newToken: null, // a token just made, its secret shown once
  kvPrefix: '', // the KV page's filter
};

// ---- Elements

const $ = (id) => document.getElementById(id);

// h builds an element: attributes (on* are listeners; class, value and
// hidden/disabled booleans handled), then children (strings become text
// nodes; null, false and nested arrays are fine).
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  let value;
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'value') value = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  add(el, children);
  if (value !== undefined) el.value = value;
  return el;
}

function add(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c == null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

// put appends children as h() does (skipping null and false); fill
// replaces them.
const put = (el, ...c) => add(el, c);
const fill = (el, ...c) => { el.replaceChildren(); return add(el, c); };

const td = (...c) => h('td', null, ...c);
const muted = (...c) => h('span', {class: 'muted'}, ...c);
const pill = (text, kind) => h('span', {class: 'pill ' + (kind || 's-' + text)}, text);
const button = (label, attrs, onclick) => h('button', {type: 'button', ...attrs, onclick}, label);

// table: a header row and body rows; orEmpty puts a placeholder row
// when there are none.
const thead = (cols) => h('thead', null, h('tr', null, cols.map((c) => h('th', null, c))));
const orEmpty = (rows, cols, text) => (rows.length ? rows : [h('tr', {class: 'empty'}, h('td', {colspan: cols}, text || 'None.'))]);
const table = (head, rows, attrs) => h('table', attrs, thead(head), h('tbody', null, orEmpty(rows, head.length)));

// dl: a definition list from [term, definition] pairs, skipping empty ones.
const dl = (pairs) => h('dl', null, pairs.filter((p) => p).map(([k, v]) => [h('dt', null, k), h('dd', null, v)]));

// confirmButton asks for a second click within 5 s instead of
// window.confirm, which blocks automated browsers and cannot be styled.
function confirmButton(label, attrs, fn) {
  const b = button(label, {...attrs, class: ((attrs && attrs.class) || '') + ' danger'});
  let timer = 0;
  const disarm = () => { clearTimeout(timer); timer = 0; b.textContent = label; b.classList.remove('armed'); };
  b.addEventListener('click', () => {
    if (timer) { disarm(); fn(); return; }
    b.textContent = `Confirm ${label.toLowerCase()}?`;
    b.classList.add('armed');
    timer = setTimeout(disarm, 5000);
  });
  return b;
}

// ---- Errors: one element, #error, shows the latest; an owner (a poller)
// clears only an error it showed itself.

let errorOwner = null;

function showError(e, owner, context) {
  if (!e || e.name === 'AbortError') return;
  const msg = typeof e === 'string' ? e : e.message || String(e);
  const el = $('error');
  el.textContent = context ? `${context}: ${msg}` : msg;
  el.hidden = false;
  errorOwner = owner || null;
}

function clearError(owner) {
  if (owner && owner !== errorOwner) return;
  const el = $('error');
  el.textContent = '';
  el.hidden = true;
  errorOwner = null;
}

// ---- Formatting

// en strips an enum's prefix: STATUS_DRAINING -> DRAINING.
const en = (v, prefix) => (v || prefix + 'UNSPECIFIED').replace(prefix, '');

// sessionHex writes a session id (an int64, a decimal string in JSON) as
// the CLI and the server's messages do: 16 hex digits.
function sessionHex(id) {
  if (!id || id === '0') return '';
  try { return BigInt.asUintN(64, BigInt(id)).toString(16).padStart(16, '0'); } catch { return String(id); }
}

// tsMs parses an RFC 3339 timestamp keeping its sub-millisecond digits.
function tsMs(s) {
  const m = /^(.*T\d\d:\d\d:\d\d)(\.\d+)?(.*)$/.exec(s || '');
  if (!m) return NaN;
  return Date.parse(m[1] + m[3]) + (m[2] ? parseFloat('0' + m[2]) * 1000 : 0);
}

function fmtTime(s) {
  const ms = tsMs(s);
  if (isNaN(ms)) return s || '';
  const d = new Date(ms), p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

const time = (s) => (s ? h('time', {datetime: s, title: s}, fmtTime(s)) : '');

// ago writes how long ago a timestamp was: "40s ago", "3h ago".
function ago(s) {
  let n = Math.max(0, (Date.now() - tsMs(s)) / 1000), u = 's';
  for (const [d, next] of [[60, 'm'], [60, 'h'], [24, 'd']]) { if (n < d) break; n /= d; u = next; }
  return isNaN(n) ? '' : h('time', {datetime: s, title: fmtTime(s)}, Math.floor(n) + u + ' ago');
}

function fmtBytes(n) {
  n = Number(n || 0);
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + ' ' + u[i];
}

const hostPort = (i) => `${(i.address || '').includes(':') ? `[${i.address}]` : i.address || ''}:${i.port || 0}`;

// fields writes a message's set fields, "key: value", for read-only views.
function fields(o) {
  if (!o || !Object.keys(o).length) return muted('defaults');
  return Object.entries(o).map(([k, v]) => `${k}: ${Array.isArray(v) ? v.join(', ') : typeof v === 'object' ? JSON.stringify(v) : v}`).join('; ');
}

const list = (s) => (s || '').split(',').map((x) => x.trim()).filter(Boolean);

// ---- Bytes: proto3 JSON writes bytes as base64; values are shown as UTF-8
// text, or as "binary" when they are not valid UTF-8.

function b64dec(s) {
  const bin = atob((s || '').replace(/-/g, '+').replace(/_/g, '/'));
  const b = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) b[i] = bin.charCodeAt(i);
  return b;
}

function b64enc(b) {
  let s = '';
  for (let i = 0; i < b.length; i += 0x8000) s += String.fromCharCode.apply(null, b.subarray(i, i + 0x8000));
  return btoa(s);
}

const utf8 = new TextDecoder('utf-8', {fatal: true});

// decodeValue returns {text, size}; text is null for a binary value.
function decodeValue(b64) {
  const b = b64dec(b64);
  try { return {text: utf8.decode(b), size: b.length}; } catch { return {text: null, size: b.length}; }
}

const encodeText = (s) => b64enc(new TextEncoder().encode(s));

function preview(b64, deleted) {
  if (deleted) return pill('deleted', 'bad');
  const v = decodeValue(b64);
  if (v.text === null) return muted(`binary, ${fmtBytes(v.size)}`);
  const line = v.text.split('\n')[0];
  return line.length > 60 || v.text.replace(/\n$/, '').includes('\n') ? line.slice(0, 60) + '…' : line;
}

// ---- The API

class ApiError extends Error {
  constructor(code, message) {
    super(message || code);
    this.code = code;
  }
}

const httpCodes = {400: 'invalid_argument', 401: 'unauthenticated', 403: 'permission_denied', 404: 'not_found', 408: 'deadline_exceeded', 409: 'aborted', 412: 'failed_precondition', 413: 'resource_exhausted', 429: 'resource_exhausted', 501: 'unimplemented', 503: 'unavailable'};

const authHeaders = (token) => (token ? {Authorization: 'Bearer ' + token} : {});

const isUnauthenticated = (e) => e && (e.code === 'unauthenticated' || /unknown token/.test(e.message || ''));

// api calls one unary method: api('RegistryService', 'ListServices',
// {namespace}). It resolves to the response message (proto3 JSON) or
// rejects with an ApiError carrying the server's code and message. With
// opts.token the call uses that token (the login form) and a refusal does
// not log out; otherwise an unauthenticated answer drops the stored token.
async function api(service, method, body, opts = {}) {
  const own = opts.token === undefined;
  let res;
  try {
    res = await fetch(`/beacon.v1.${service}/${method}`, {
      method: 'POST',
      headers: {'Content-Type': 'application/json', 'Connect-Protocol-Version': '1', ...authHeaders(own ? S.token : opts.token)},
      body: JSON.stringify(body || {}),
      signal: opts.signal,
    });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError('unavailable', `the server cannot be reached (${e.message})`);
  }
  const raw = await res.text();
  let data = null;
  try { data = raw ? JSON.parse(raw) : {}; } catch { /* not JSON: a proxy's error page */ }
  if (res.ok && data) return data;
  const err = new ApiError((data && data.code) || httpCodes[res.status] || 'unknown',
    (data && data.message) || raw.trim() || `${method}: HTTP ${res.status}`);
  if (own && isUnauthenticated(err)) loggedOut(err.message);
  throw err;
}

const sleep = (ms, signal) => new Promise((resolve) => {
  const done = () => { clearTimeout(t); signal && signal.removeEventListener('abort', done); resolve(); };
  const t = setTimeout(done, ms);
  signal && signal.addEventListener('abort', done);
});

// every calls fn now and then every ms (never two at once) until signal
// aborts or fn returns false.
async function every(ms, fn, signal) {
  while (!signal.aborted) {
    if ((await fn()) === false) return;
    await sleep(ms, signal);
  }
}

// watch reads GET /v1/watch (the namespace's services, all when services
// is empty) and calls onMessage(msg, first) for each NDJSON line, first
// being the first line of a connection. It reconnects with a backoff of
// 1 s doubling to 10 s, jittered, until signal aborts; onState hears
// 'connecting', 'live' (synced) and 'down'.
async function watch(ns, services, onMessage, signal, onState = () => {}) {
  let backoff = 1000;
  while (!signal.aborted) {
    const q = new URLSearchParams({namespace: ns});
    for (const s of services) q.append('service', s);
    onState('connecting');
    try {
      const res = await fetch('/v1/watch?' + q, {headers: authHeaders(S.token), signal, cache: 'no-store'});
      if (!res.ok) {
        const msg = (await res.text()).trim() || `HTTP ${res.status}`;
        if (res.status === 401) { loggedOut(msg); return; }
        throw new Error('watch: ' + msg);
      }
      const reader = res.body.getReader(), dec = new TextDecoder();
      let buf = '', first = true;
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buf += dec.decode(value, {stream: true});
        let nl;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, nl).trim();
          buf = buf.slice(nl + 1);
          if (!line) continue;
          const msg = JSON.parse(line);
          onMessage(msg, first);
          first = false;
          backoff = 1000;
          if (msg.synced) onState('live');
        }
      }
      onState('down', 'the watch ended');
    } catch (e) {
      if (signal.aborted) return;
      onState('down', e.message);
    }
    await sleep(backoff * (0.5 + Math.random() / 2), signal);
    backoff = Math.min(backoff * 2, 10000);
  }
}

// liveSet keeps a watch's services by name and calls onChange(map, msg)
// when they change. A connection's first snapshots (up to synced) are
// collected apart and then replace the whole map, so that a service gone
// while the stream was down disappears on reconnect.
function liveSet(onChange) {
  let cur = new Map(), next = null;
  return (msg, first) => {
    if (first) next = new Map();
    const into = next || cur;
    for (const s of msg.snapshots || []) into.set(s.service, s);
    if (next && msg.synced) { cur = next; next = null; }
    if (!next) onChange(cur, msg);
  };
}

function liveBadge() {
  const el = h('span', {class: 'live', id: 'live', 'data-state': 'connecting'}, 'connecting…');
  const text = {live: 'live', connecting: 'connecting…', down: 'reconnecting…'};
  return {el, set(state, why) { el.dataset.state = state; el.textContent = text[state]; el.title = why || ''; }};
}

// authorize asks what the token may do here (AclService/Authorize). Write
// buttons are drawn only where it says yes; should it fail (an older
// server), they are drawn and the server's refusal, which names the
// permission, is shown instead.
async function authorize(ns, service, key) {
  const checks = [], idx = {};
  const ask = (name, c) => { idx[name] = checks.length; checks.push(c); };
  if (service) ask('serviceWrite', {resource: 'service', namespace: ns, name: service, access: 'write'});
  if (key) ask('keyWrite', {resource: 'key', namespace: ns, name: key, access: 'write'});
  ask('aclWrite', {resource: 'acl', access: 'write'});
  ask('aclRead', {resource: 'acl', access: 'read'});
  ask('sessionRead', {resource: 'session', access: 'read'});
  ask('operatorRead', {resource: 'operator', access: 'read'});
  const p = {};
  try {
    const r = await api('AclService', 'Authorize', {checks});
    p.aclEnabled = !!r.aclEnabled;
    for (const [name, i] of Object.entries(idx)) p[name] = !p.aclEnabled || !!(r.allowed || [])[i];
    if (S.aclEnabled !== p.aclEnabled) { S.aclEnabled = p.aclEnabled; renderWho(); }
  } catch (e) {
    if (isUnauthenticated(e)) throw e;
    p.unknown = true;
    for (const name in idx) p[name] = true;
  }
  return p;
}

// ---- Session state and the top bar

function renderWho() {
  const who = $('who');
  if (S.aclEnabled === false) {
    who.textContent = 'ACLs off';
  } else {
    const t = S.who && S.who.token;
    who.textContent = S.token ? (t && t.accessorId) || '…' : 'anonymous';
    who.title = (t && t.description) || '';
  }
  $('logout').hidden = !S.token;
  $('login-link').hidden = !!S.token || S.aclEnabled === false;
}

function setToken(token, who) {
  S.token = token;
  S.who = who;
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
  if (who) S.aclEnabled = !!who.aclEnabled;
  renderWho();
}

// loggedOut drops a token the server no longer knows (deleted, expired)
// and goes to the login page with the server's reason.
function loggedOut(reason) {
  if (!S.token) return;
  setToken('', null);
  if (location.hash === '#/login') { showError(reason); return; }
  S.loginNote = reason;
  location.hash = '#/login';
}

async function whoAmI() {
  try {
    const r = await api('AclService', 'WhoAmI', {});
    S.who = r;
    S.aclEnabled = !!r.aclEnabled;
  } catch (e) {
    if (!isUnauthenticated(e)) showError(e, null, 'WhoAmI');
  }
  renderWho();
}

function fillNamespaces(names) {
  const all = [...new Set([...names, 'default', S.ns])].sort();
  const sel = $('ns');
  fill(sel, ...all.map((n) => h('option', {value: n}, n)));
  sel.value = S.ns;
}

async function loadNamespaces() {
  try {
    const r = await api('RegistryService', 'ListNamespaces', {});
    fillNamespaces((r.namespaces || []).map((n) => n.name));
  } catch (e) {
    fillNamespaces([]); // the selector keeps the namespace in use
  }
}

// useNamespace makes ns current (from the selector or a URL).
function useNamespace(ns) {
  if (!ns || ns === S.ns) return;
  S.ns = ns;
  sessionStorage.setItem(NS_KEY, ns);
  const sel = $('ns');
  if (![...sel.options].some((o) => o.value === ns)) put(sel, h('option', {value: ns}, ns));
  sel.value = ns;
}

// ---- Routing: #/page/arg/... with URI-encoded segments.

const enc = encodeURIComponent;
const serviceHref = (ns, name) => `#/services/${enc(ns)}/${enc(name)}`;
const keyHref = (ns, key) => `#/kv/${enc(ns)}/${key.split('/').map(enc).join('/')}`;

function parseRoute() {
  const parts = location.hash.replace(/^#\/?/, '').split('/');
  return parts.map((p) => { try { return decodeURIComponent(p); } catch { return p; } });
}

const pages = {
  login: pageLogin,
  services: pageServices,
  sessions: pageSessions,
  namespaces: pageNamespaces,
  kv: pageKV,
  locks: pageLocks,
  acl: pageAcl,
  cluster: pageCluster,
};

function route() {
  const [page, ...args] = parseRoute();
  if (!pages[page]) { location.replace('#/services'); return; }
  if (S.view) S.view.abort(); // ends the previous page's watches and pollers
  const ctl = new AbortController();
  S.view = ctl;
  clearError();
  for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', a.dataset.page === page);
  const root = h('div', {class: 'page', 'data-page': page});
  $('main').replaceChildren(root);
  pages[page]({root, args, signal: ctl.signal}).catch((e) => { if (!ctl.signal.aborted) showError(e); });
}

// ---- Pages. Each gets {root, args, signal}: it draws into root (detached
// once the user navigates away) and stops its loops when signal aborts.

async function pageLogin(v) {
  const input = h('input', {id: 'token', type: 'password', autocomplete: 'off', placeholder: 'secret id', size: 44});
  const btn = h('button', {id: 'login', type: 'submit'}, 'Log in');
  const state = h('p', {class: 'muted', id: 'acl-state'});
  const form = h('form', {id: 'login-form', class: 'card', onsubmit: async (e) => {
    e.preventDefault();
    const token = input.value.trim();
    if (!token) { showError('Enter an ACL token (its secret id).'); return; }
    btn.disabled = true;
    try {
      const r = await api('AclService', 'WhoAmI', {}, {token});
      setToken(token, r);
      clearError();
      loadNamespaces();
      location.hash = '#/services';
    } catch (err) {
      showError(err, null, 'Log in');
    } finally {
      btn.disabled = false;
    }
  }}, h('label', {for: 'token'}, 'ACL token'), input, btn);
  put(v.root, h('h1', null, 'Log in'), form, state);
  if (S.loginNote) { showError(S.loginNote, null, 'Logged out'); S.loginNote = ''; }
  input.focus();
  try {
    const r = await api('AclService', 'WhoAmI', {}, {token: '', signal: v.signal});
    if (!r.aclEnabled) {
      S.aclEnabled = false;
      renderWho();
      fill(state, 'ACLs off: no login is needed. ', h('a', {href: '#/services'}, 'Go to services'));
    } else {
      state.textContent = 'The token stays in this tab only (sessionStorage) and is sent to this server alone.';
    }
  } catch (e) { /* the form still works */ }
}

async function pageServices(v) {
  if (v.args.length >= 2) return pageService(v);
  const ns = S.ns, live = liveBadge();
  const note = h('p', {class: 'note', id: 'filtered', hidden: true}, 'Some services are not listed: this token may not read them.',
    !S.token && S.aclEnabled !== false ? [' ', h('a', {href: '#/login'}, 'Log in')] : null);
  const body = h('tbody');
  put(v.root, h('h1', null, 'Services ', muted('in ' + ns), ' ', live.el), note,
    h('table', {id: 'services'}, thead(['Service', 'Instances', 'Routable', 'Protected', 'Suspect', 'Revision']), body));
  let rows = new Map();
  const draw = () => {
    const names = [...rows.keys()].sort();
    fill(body, orEmpty(names.map((n) => serviceRow(ns, rows.get(n))), 6, 'No services in this namespace.'));
  };
  try {
    const r = await api('RegistryService', 'ListServices', {namespace: ns}, {signal: v.signal});
    for (const s of r.services || []) rows.set(s.name, s);
    note.hidden = !r.resultsFiltered;
  } catch (e) {
    showError(e);
  }
  draw();
  watch(ns, [], liveSet((map, msg) => {
    rows = new Map();
    for (const [name, snap] of map) if ((snap.instances || []).length) rows.set(name, summarize(snap));
    if (msg.resultsFiltered) note.hidden = false;
    draw();
  }), v.signal, live.set);
}

// summarize computes a ServiceSummary from a snapshot as the server does:
// routable is UP and not CRITICAL; protection engages when the routable
// share of the UP instances falls below the threshold.
function summarize(snap) {
  const ins = snap.instances || [];
  const up = ins.filter((i) => i.status === 'STATUS_UP');
  const routable = up.filter((i) => i.health !== 'HEALTH_CRITICAL').length;
  const th = snap.protectionThreshold || 0;
  return {
    name: snap.service, instances: ins.length, routable, revision: snap.revision,
    suspect: ins.filter((i) => i.suspect).length,
    protected: th > 0 && up.length > 0 && routable < th * up.length,
  };
}

function serviceRow(ns, s) {
  return h('tr', {'data-service': s.name},
    td(h('a', {href: serviceHref(ns, s.name)}, s.name)),
    td(s.instances || 0), td(s.routable || 0),
    td(s.protected ? pill('protected', 'warn') : ''),
    td(s.suspect ? pill(`${s.suspect} suspect`, 'warn') : '0'),
    td(s.revision || ''));
}

async function pageService(v) {
  const [ns, name] = v.args;
  useNamespace(ns);
  const live = liveBadge();
  const summary = h('p', {class: 'muted', id: 'service-summary'});
  const note = h('p', {class: 'note', hidden: true});
  const body = h('tbody');
  let head = h('thead');
  const explainPanel = h('section', {id: 'explain', class: 'panel', hidden: true});
  const settings = h('section', {id: 'settings'}, h('h2', null, 'Settings'), muted('Loading…'));
  const prop = h('section', {id: 'propagation'}, h('h2', null, 'Propagation'), muted('Loading…'));
  put(v.root,
    h('p', {class: 'crumbs'}, h('a', {href: '#/services'}, 'Services'), ' / ', ns),
    h('h1', null, name, ' ', live.el), summary, note,
    h('table', {id: 'instances'}, head, body), explainPanel, settings, prop);

  let instances = [], filtered = false, threshold = 0, revision = '', perm = null, loaded = false;
  const rowCache = new Map(); // id -> {key, tr}: unchanged rows stay, so a click is not lost to a redraw
  const draw = () => {
    const cols = ['Instance', 'Address', 'Status', 'Health', 'Zone', 'Weight', 'Version', 'Tags', 'Metadata', !filtered && 'Session', 'Checks', ''].filter((c) => c !== false);
    head.replaceWith(head = thead(cols));
    const seen = new Set();
    const rows = instances.map((i) => {
      seen.add(i.id);
      const key = JSON.stringify(i) + filtered + (perm && perm.serviceWrite);
      const c = rowCache.get(i.id);
      if (c && c.key === key) return c.tr;
      const tr = instanceRow(ns, name, i, {filtered, write: perm && perm.serviceWrite, explain: () => explain(explainPanel, ns, name, i.id)});
      rowCache.set(i.id, {key, tr});
      return tr;
    });
    for (const id of rowCache.keys()) if (!seen.has(id)) rowCache.delete(id);
    fill(body, orEmpty(rows, cols.length, 'No instances.'));
    const s = summarize({service: name, instances, protectionThreshold: threshold});
    fill(summary, `${s.instances} instances, ${s.routable} routable`, s.suspect ? `, ${s.suspect} suspect` : '',
      revision ? `, revision ${revision}` : '', ' ', s.protected ? pill('protected', 'warn') : '');
    note.hidden = !filtered;
    note.textContent = instances.length ? 'Session ids are hidden: this token may not read sessions.' : 'This token may not read this service.';
  };

  authorize(ns, name).then((p) => { perm = p; if (loaded) draw(); }).catch(() => {});
  serviceSettings(settings, ns, name, v.signal);
  propagation(prop, ns, name, v.signal);
  try {
    const r = await api('RegistryService', 'ListInstances', {namespace: ns, service: name, all: true}, {signal: v.signal});
    instances = r.instances || [];
    filtered = !!r.resultsFiltered;
    threshold = r.protectionThreshold || 0;
    revision = r.revision || '';
  } catch (e) {
    showError(e);
  }
  loaded = true;
  draw();
  watch(ns, [name], liveSet((map, msg) => {
    const snap = map.get(name);
    instances = (snap && snap.instances) || [];
    if (snap) { threshold = snap.protectionThreshold || 0; revision = snap.revision || revision; }
    if (msg.resultsFiltered) filtered = true;
    draw();
  }), v.signal, live.set);
}

function instanceRow(ns, service, i, o) {
  const st = en(i.status, 'STATUS_'), hl = en(i.health, 'HEALTH_');
  const setStatus = (status, label) => async () => {
    try {
      await api('RegistryService', 'SetStatus', {namespace: ns, service, id: i.id, status});
      clearError();
    } catch (e) { showError(e, null, `${label} ${i.id}`); }
  };
  const deregister = async () => {
    try {
      await api('RegistryService', 'Deregister', {namespace: ns, service, id: i.id});
      clearError();
    } catch (e) { showError(e, null, `Deregister ${i.id}`); }
  };
  const actions = [button('Why no traffic?', {class: 'explain', 'data-action': 'explain'}, o.explain)];
  if (o.write) {
    actions.push(
      button('Drain', {class: 'drain', 'data-action': 'drain', disabled: st === 'DRAINING'}, setStatus('STATUS_DRAINING', 'Drain')),
      button('Out of service', {class: 'out-of-service', 'data-action': 'out-of-service', disabled: st === 'OUT_OF_SERVICE'}, setStatus('STATUS_OUT_OF_SERVICE', 'Out of service')),
      button('Up', {class: 'up', 'data-action': 'up', disabled: st === 'UP'}, setStatus('STATUS_UP', 'Up')),
      confirmButton('Deregister', {class: 'deregister', 'data-action': 'deregister'}, deregister));
  }
  const meta = Object.entries(i.metadata || {}).sort(([a], [b]) => (a < b ? -1 : 1));
  return h('tr', {'data-id': i.id, 'data-status': st, 'data-health': hl, class: i.suspect ? 'suspect' : null},
    td(h('code', null, i.id), i.suspect ? [' ', pill('suspect', 'warn')] : null),
    td(hostPort(i)),
    td(pill(st)), td(pill(hl)),
    td(i.zone || ''), td(i.weight || 100), td(i.version || ''),
    td((i.tags || []).map((t) => h('span', {class: 'tag'}, t))),
    td(meta.map(([k, val]) => h('div', {class: 'meta'}, h('b', null, k), '=', val))),
    o.filtered ? null : td(sessionHex(i.sessionId) || muted('persistent')),
    td((i.checks || []).map((c) => h('div', {class: 'check', 'data-check': c.name || ''},
      h('b', null, c.name || en(c.kind, 'CHECK_KIND_').toLowerCase()), ' ', muted(en(c.kind, 'CHECK_KIND_')), ' ',
      pill(en(c.status, 'HEALTH_')), c.since ? [' ', muted('since ', ago(c.since))] : null,
      c.output ? h('div', {class: 'output'}, c.output) : null))),
    h('td', {class: 'actions'}, h('div', {class: 'btns'}, actions)));
}

async function explain(panel, ns, service, id) {
  const close = button('Close', {class: 'close'}, () => { panel.hidden = true; });
  const title = h('div', {class: 'panel-head'}, h('h2', null, 'Why no traffic? ', h('code', null, id)), close);
  panel.hidden = false;
  fill(panel, title, muted('Asking…'));
  try {
    const r = await api('RegistryService', 'ExplainInstance', {namespace: ns, service, id});
    clearError();
    const ok = !!r.getsTraffic;
    fill(panel, title,
      h('p', {id: 'explain-verdict', class: 'verdict ' + (ok ? 'ok' : 'bad'), 'data-gets-traffic': String(ok)},
        ok ? 'Gets traffic: callers that follow the registry send it requests.' : r.instance ? 'Gets no traffic.' : 'Not registered: gets no traffic.'),
      h('ul', {class: 'reasons'}, (r.reasons || []).map((x) => h('li', {class: 'reason' + (x.excludes ? ' excludes' : ''), 'data-rule': x.rule || ''},
        h('b', null, x.rule || ''), ' ', x.excludes ? pill('excludes', 'bad') : pill('ok', 'good'), ' ', x.detail || ''))),
      muted(`Computed at revision ${r.revision || 0}.`));
    panel.scrollIntoView({block: 'nearest'});
  } catch (e) {
    panel.hidden = true;
    showError(e, null, 'Why no traffic');
  }
}

async function serviceSettings(section, ns, service, signal) {
  try {
    const r = await api('RegistryService', 'GetServiceConfig', {namespace: ns, service}, {signal});
    const c = r.config || {};
    const th = c.protectionThreshold || 0;
    const lb = c.loadBalancing || {};
    const {policy, ...lbRest} = lb;
    fill(section, h('h2', null, 'Settings'), dl([
      ['Protection threshold', [th ? String(th) : 'off', c.protectionThresholdDefault ? muted(' (server default)') : '']],
      ['Load balancing', [en(policy, 'LOAD_BALANCING_POLICY_').replace('UNSPECIFIED', 'ROUND_ROBIN (default)'), Object.keys(lbRest).length ? ' — ' + fields(lbRest) : '']],
      ['Retries', c.retryPolicy ? fields(c.retryPolicy) : muted('none')],
      ['Outlier detection', fields(c.outlierDetection)],
      ['Read at revision', r.revision || ''],
    ]));
  } catch (e) {
    if (e.name === 'AbortError') return;
    fill(section, h('h2', null, 'Settings'), muted('Unavailable.'));
    showError(e, null, 'Settings');
  }
}

// propagation polls ServicePropagation every 2 s while the page is open.
function propagation(section, ns, service, signal) {
  const owner = {};
  const h2 = h('h2', null, 'Propagation');
  every(2000, async () => {
    try {
      const r = await api('RegistryService', 'ServicePropagation', {namespace: ns, service}, {signal});
      clearError(owner);
      const rows = (r.changes || []).map((c) => {
        const lag = c.lastAck && c.published ? (tsMs(c.lastAck) - tsMs(c.published)).toFixed(1) + ' ms' : '—';
        const pending = (c.acknowledged || 0) + (c.gone || 0) < (c.watchers || 0);
        return h('tr', {'data-revision': c.revision, class: pending ? 'pending' : null},
          td(c.revision), td(time(c.published)), td(c.watchers || 0), td(c.acknowledged || 0), td(c.gone || 0), td(lag));
      });
      fill(section, h2,
        table(['Revision', 'Published', 'Watchers', 'Acknowledged', 'Gone', 'Last ack − published'], rows, {id: 'propagation-changes'}),
        h('p', {class: 'muted'}, 'Tracked until ', time(r.trackedUntil) || '—',
          ' (each look extends tracking by 10 minutes; only acknowledging watchers are counted).'));
    } catch (e) {
      if (e.name === 'AbortError') return false;
      showError(e, owner, 'Propagation');
      if (['permission_denied', 'unimplemented', 'unauthenticated'].includes(e.code)) {
        fill(section, h2, muted('Unavailable.'));
        return false;
      }
    }
  }, signal);
}

async function pageSessions(v) {
  put(v.root, h('h1', null, 'Sessions'));
  const r = await api('RegistryService', 'ListSessions', {limit: 1000}, {signal: v.signal});
  const rows = (r.sessions || []).map((s) => h('tr', {'data-id': sessionHex(s.id)},
    td(h('code', null, sessionHex(s.id))), td(s.name || ''), td(s.ttl || ''), td(time(s.created)), td(s.instances || 0)));
  put(v.root, table(['Session', 'Name', 'TTL', 'Created', 'Instances'], rows, {id: 'sessions'}),
    r.more ? h('p', {class: 'note', id: 'sessions-more'}, `More sessions exist: the first ${rows.length} are listed.`) : null);
}

async function pageNamespaces(v) {
  put(v.root, h('h1', null, 'Namespaces'));
  const r = await api('RegistryService', 'ListNamespaces', {}, {signal: v.signal});
  const names = (r.namespaces || []).map((n) => n.name);
  fillNamespaces(names);
  const rows = (r.namespaces || []).map((n) => h('tr', {'data-ns': n.name, class: n.name === S.ns ? 'selected' : null},
    td(h('a', {href: '#/services', onclick: () => useNamespace(n.name)}, n.name)), td(n.services || 0), td(n.instances || 0)));
  put(v.root, table(['Namespace', 'Services', 'Instances'], rows, {id: 'namespaces'}),
    r.resultsFiltered ? h('p', {class: 'note'}, 'Namespaces with no service this token may read are not listed.') : null);
}

// ---- KV

async function pageKV(v) {
  if (v.args.length >= 2) return pageKey(v);
  const ns = S.ns;
  const prefix = h('input', {id: 'kv-prefix', type: 'search', placeholder: 'filter by prefix', value: S.kvPrefix});
  const body = h('tbody');
  const foot = h('p');
  const newKey = h('input', {id: 'kv-new-key', placeholder: 'key, e.g. shop/pricing', size: 36});
  const newValue = h('textarea', {id: 'kv-new-value', rows: 4, placeholder: 'value (UTF-8 text)', spellcheck: 'false'});
  const create = async (e) => {
    e.preventDefault();
    const key = newKey.value.trim();
    if (!key) { showError('Name the key.'); return; }
    try {
      // expectedRevision 0: only if the key does not exist yet.
      await api('KVService', 'Put', {namespace: ns, key, value: encodeText(newValue.value), expectedRevision: '0'});
      clearError();
      location.hash = keyHref(ns, key);
    } catch (err) { showError(err, null, 'Create ' + key); }
  };
  put(v.root, h('h1', null, 'KV ', muted('in ' + ns)), h('p', null, prefix),
    h('table', {id: 'kv-keys'}, thead(['Key', 'Revision', 'Version', 'Created at']), body),
    foot,
    h('div', {class: 'card'}, h('h3', null, 'New key'),
      h('form', {id: 'kv-new', onsubmit: create}, newKey, newValue, h('button', {id: 'kv-create', type: 'submit'}, 'Create'))));

  let seq = 0;
  const load = async (after) => {
    const mine = ++seq;
    S.kvPrefix = prefix.value;
    try {
      const r = await api('KVService', 'List', {namespace: ns, prefix: prefix.value, keysOnly: true, limit: 200, startAfter: after || ''}, {signal: v.signal});
      if (mine !== seq) return;
      clearError();
      const rows = (r.kvs || []).map((kv) => h('tr', {'data-key': kv.key},
        td(h('a', {href: keyHref(ns, kv.key)}, kv.key)), td(kv.modRevision || ''), td(kv.version || ''), td(kv.createRevision || '')));
      if (after) put(body, rows);
      else fill(body, orEmpty(rows, 4, 'No keys.'));
      const last = r.kvs && r.kvs.length ? r.kvs[r.kvs.length - 1].key : '';
      fill(foot,
        r.resultsFiltered ? h('span', {class: 'note'}, 'Keys this token may not read are not listed. ') : '',
        r.more ? button('Load more', {id: 'kv-more'}, () => load(last)) : '');
    } catch (e) { showError(e, null, 'List keys'); }
  };
  let t = 0;
  prefix.addEventListener('input', () => { clearTimeout(t); t = setTimeout(() => load(''), 250); });
  await load('');
}

async function pageKey(v) {
  const [ns, ...rest] = v.args;
  const key = rest.join('/');
  useNamespace(ns);
  const info = h('p', {class: 'muted', id: 'kv-info'});
  const value = h('textarea', {id: 'kv-value', rows: 14, spellcheck: 'false'});
  const tools = h('p', {class: 'tools'});
  const rollout = h('section', {id: 'kv-rollout', hidden: true});
  const history = h('section', {id: 'kv-history'}, h('h2', null, 'History'));
  const diff = h('section', {id: 'kv-diff'});
  put(v.root, h('p', {class: 'crumbs'}, h('a', {href: '#/kv'}, 'KV'), ' / ', ns),
    h('h1', null, h('code', null, key)), info, value, tools, rollout, history, diff);

  const perm = authorize(ns, null, key);
  let readRev = '0', current = {text: '', size: 0}, selected = null, versions = [];

  const save = async () => {
    try {
      // The compare-revision is the one the value was read at: a change
      // made since is refused (failed_precondition) instead of overwritten.
      const r = await api('KVService', 'Put', {namespace: ns, key, value: encodeText(value.value), expectedRevision: readRev});
      clearError();
      await load();
      put(info, h('span', {class: 'saved'}, ` Saved at revision ${r.revision}.`));
    } catch (e) {
      showError(e, null, 'Save');
      if (e.code === 'failed_precondition' || e.code === 'aborted') {
        $('error').append(' — the key changed since it was read: Reload shows the new value (your text is lost then; copy it first).');
      }
    }
  };
  const rollback = async (rev) => {
    try {
      await api('KVService', 'Rollback', {namespace: ns, key, toRevision: rev, expectedRevision: readRev});
      clearError();
      selected = null;
      await load();
    } catch (e) { showError(e, null, `Rollback to ${rev}`); }
  };

  const drawDiff = () => {
    const sel = versions.find((x) => x.revision === selected);
    if (!sel) { diff.replaceChildren(); return; }
    const old = sel.deleted ? {text: '', size: 0} : decodeValue(sel.value);
    const head = h('h2', null, `Diff: revision ${sel.revision} → current`);
    if (old.text === null || current.text === null) { fill(diff, head, muted('Binary values: no line diff.')); return; }
    const lines = diffLines(old.text, current.text);
    const changed = lines.some(([op]) => op !== ' ');
    fill(diff, head, h('pre', {class: 'diff', 'data-from': sel.revision},
      changed ? lines.map(([op, text]) => h('span', {class: op === '+' ? 'add' : op === '-' ? 'del' : 'same'}, op + ' ' + text)) : muted('Identical to the current value.')));
  };

  const drawHistory = (p) => {
    const last = versions[versions.length - 1];
    const rows = versions.slice().reverse().map((x) => h('tr', {'data-version': x.revision, class: x.revision === selected ? 'selected' : null},
      td(x.revision), td(time(x.time)), td(x.accessor || muted('—')),
      td(preview(x.value, x.deleted), x.rollbackOf ? muted(` (rollback to ${x.rollbackOf})`) : ''),
      h('td', {class: 'actions'},
        x === last ? muted('current') : button('Diff', {class: 'kv-diff-select', 'data-version': x.revision}, () => { selected = x.revision; drawHistory(p); drawDiff(); }),
        p.keyWrite && x !== last && !x.deleted ? button('Rollback', {class: 'kv-rollback', 'data-version': x.revision}, () => rollback(x.revision)) : null)));
    fill(history, h('h2', null, 'History'), table(['Revision', 'Time', 'By', 'Value', ''], rows, {id: 'kv-versions'}));
  };

  const load = async () => {
    const [got, hist, p] = await Promise.all([
      api('KVService', 'Get', {namespace: ns, key}, {signal: v.signal}).catch((e) => { if (e.code === 'not_found') return null; throw e; }),
      api('KVService', 'History', {namespace: ns, key}, {signal: v.signal}).catch((e) => { showError(e, null, 'History'); return {versions: []}; }),
      perm,
    ]);
    const kv = got && got.kv;
    readRev = (kv && kv.modRevision) || '0';
    current = kv ? decodeValue(kv.value) : {text: '', size: 0};
    value.disabled = current.text === null;
    value.readOnly = !p.keyWrite;
    value.value = current.text === null ? '' : current.text;
    fill(info, kv
      ? `Revision ${kv.modRevision}, version ${kv.version}, created at revision ${kv.createRevision}, ${fmtBytes(current.size)}.`
      : 'The key does not exist' + (hist.versions && hist.versions.length ? ' (deleted): Save writes it again, Rollback restores a version.' : ': Save creates it.'),
    current.text === null ? h('span', {class: 'note'}, ' Binary value (not UTF-8): not editable here.') : '');
    fill(tools,
      p.keyWrite && current.text !== null ? h('button', {id: 'kv-save', type: 'button', onclick: save}, 'Save') : null,
      button('Reload', {id: 'kv-reload'}, () => load().catch(showError)),
      p.keyWrite ? null : muted(' Read only: this token may not write the key.'));
    versions = hist.versions || [];
    if (selected === null && versions.length > 1) selected = versions[versions.length - 2].revision;
    drawHistory(p);
    drawDiff();
    loadRollout();
  };

  const loadRollout = async () => {
    try {
      const r = await api('KVService', 'RolloutStatus', {namespace: ns, key}, {signal: v.signal});
      const ro = r.rollout;
      rollout.hidden = !ro;
      if (!ro) return;
      const labels = Object.entries(ro.labels || {}).map(([k, val]) => `${k}=${val}`).join(', ');
      fill(rollout, h('h2', null, 'Staged rollout'), dl([
        ['Rollout revision', r.rolloutRevision || ''],
        ['Readers', `${labels || 'any labels'}, ${ro.percent && ro.percent < 100 ? ro.percent + '%' : 'all'}`],
        ['Base revision', ro.baseRevision || ''],
        ['Started', [time(ro.started), ro.accessor ? ' by ' + ro.accessor : '']],
        ['Value', preview(ro.value)],
      ]), table(['Reader', 'Session', 'Revision', 'Error', 'Time'], (r.reports || []).map((x) => h('tr', {class: x.error ? 'refused' : null},
        td(x.label || ''), td(h('code', null, sessionHex(x.sessionId))), td(x.revision || ''), td(x.error || ''), td(time(x.time)))), {id: 'kv-reports'}));
    } catch (e) {
      if (e.name !== 'AbortError' && e.code !== 'not_found') showError(e, null, 'Rollout status');
    }
  };

  await load();
}

// diffLines diffs two texts by lines (a longest common subsequence after
// trimming the common head and tail) and returns [op, line] pairs, op
// being ' ', '-' (only in a) or '+' (only in b). Past 4M line pairs it
// gives up on the LCS and shows a as removed, b as added.
function diffLines(a, b) {
  const A = a.split('\n'), B = b.split('\n');
  let pre = 0, suf = 0;
  while (pre < A.length && pre < B.length && A[pre] === B[pre]) pre++;
  while (suf < A.length - pre && suf < B.length - pre && A[A.length - 1 - suf] === B[B.length - 1 - suf]) suf++;
  const x = A.slice(pre, A.length - suf), y = B.slice(pre, B.length - suf);
  const out = A.slice(0, pre).map((l) => [' ', l]);
  const n = x.length, m = y.length, w = m + 1;
  if (n * m > 4e6) {
    for (const l of x) out.push(['-', l]);
    for (const l of y) out.push(['+', l]);
  } else {
    const L = new Uint32Array((n + 1) * w); // L[i*w+j]: LCS length of x[i:], y[j:]
    for (let i = n - 1; i >= 0; i--) {
      for (let j = m - 1; j >= 0; j--) L[i * w + j] = x[i] === y[j] ? L[(i + 1) * w + j + 1] + 1 : Math.max(L[(i + 1) * w + j], L[i * w + j + 1]);
    }
    let i = 0, j = 0;
    while (i < n && j < m) {
      if (x[i] === y[j]) { out.push([' ', x[i]]); i++; j++; } else if (L[(i + 1) * w + j] >= L[i * w + j + 1]) out.push(['-', x[i++]]);
      else out.push(['+', y[j++]]);
    }
    while (i < n) out.push(['-', x[i++]]);
    while (j < m) out.push(['+', y[j++]]);
  }
  for (const l of A.slice(A.length - suf)) out.push([' ', l]);
  return out;
}

// ---- Locks

async function pageLocks(v) {
  const ns = S.ns;
  const detail = h('section', {id: 'lock-detail', class: 'panel', hidden: true});
  put(v.root, h('h1', null, 'Locks ', muted('in ' + ns)));
  const holderValue = (x) => (x && x.value ? preview(x.value) : '');
  const describe = async (name) => {
    try {
      const r = await api('LockService', 'Describe', {namespace: ns, name}, {signal: v.signal});
      clearError();
      const l = r.lock || {}, hd = l.holder;
      detail.hidden = false;
      fill(detail, h('div', {class: 'panel-head'}, h('h2', null, h('code', null, name)), button('Close', {class: 'close'}, () => { detail.hidden = true; })),
        dl([
          ['Holder', hd ? h('code', {id: 'lock-holder'}, sessionHex(hd.sessionId)) : muted('free')],
          hd && ['Fencing token', h('span', {id: 'lock-fencing'}, hd.fencingToken || '')],
          hd && hd.value && ['Value', holderValue(hd)],
          l.lockDelay && ['Lock delay', pill('waiting out the lock delay', 'warn')],
        ]),
        h('h3', null, 'Waiters'),
        table(['#', 'Session', 'Fencing token', 'Value'], (l.waiters || []).map((w, k) => h('tr', null,
          td(k + 1), td(h('code', null, sessionHex(w.sessionId))), td(w.fencingToken || ''), td(holderValue(w)))), {id: 'lock-waiters'}));
    } catch (e) { showError(e, null, 'Describe ' + name); }
  };
  const r = await api('LockService', 'List', {namespace: ns}, {signal: v.signal});
  const rows = (r.locks || []).map((l) => h('tr', {'data-lock': l.name},
    td(button(l.name, {class: 'link'}, () => describe(l.name))),
    td(l.holder ? h('code', null, sessionHex(l.holder.sessionId)) : muted('free')),
    td((l.holder && l.holder.fencingToken) || ''), td((l.waiters || []).length),
    td(l.lockDelay ? pill('lock delay', 'warn') : '')));
  put(v.root, table(['Lock', 'Holder', 'Fencing token', 'Waiters', ''], rows, {id: 'locks'}),
    r.resultsFiltered ? h('p', {class: 'note'}, 'Locks this token may not read are not listed.') : null, detail);
}

// ---- ACL

async function pageAcl(v) {
  put(v.root, h('h1', null, 'ACL'));
  const p = await authorize(S.ns);
  if (p.aclEnabled === false) { put(v.root, h('p', {class: 'notice', id: 'acl-off'}, 'ACLs are off on this server: there are no tokens to manage.')); return; }
  const denied = h('p', {class: 'notice', id: 'acl-denied'}, 'ACL management is for management tokens only: this token lacks acl:read.');
  if (!p.aclRead) { put(v.root, denied); return; }
  let lists;
  try {
    lists = await Promise.all(['ListTokens', 'ListPolicies', 'ListRoles'].map((m) => api('AclService', m, {}, {signal: v.signal})));
  } catch (e) {
    if (e.code === 'permission_denied') put(v.root, denied);
    throw e;
  }
  const [{tokens = []}, {policies = []}, {roles = []}] = lists;
  const w = p.aclWrite;
  const ids = (xs) => (xs || []).map((s) => `${s.namespace || 'default'}/${s.service}`).join(', ');
  const parseIds = (s) => list(s).map((x) => { const [a, b] = x.includes('/') ? x.split('/') : ['default', x]; return {namespace: a, service: b}; });
  const joined = (xs) => td((xs || []).join(', '));
  // call makes one ACL change and draws the page again.
  const call = async (label, method, body, after) => {
    try { const r = await api('AclService', method, body); clearError(); if (after) after(r); route(); } catch (e) { showError(e, null, label); }
  };
  const del = (kind, method, field, name) => h('td', {class: 'actions'}, w && name !== 'anonymous'
    ? confirmButton('Delete', {class: 'acl-delete', 'data-kind': kind, 'data-name': name}, () => call(`Delete ${kind} ${name}`, method, {[field]: name})) : null);
  // form is a "New <kind>" form; toBody makes the request from the inputs' values.
  const form = (kind, inputs, method, toBody, after) => {
    if (!w) return null;
    const els = inputs.map(([name, ph]) => (name === 'rules'
      ? h('textarea', {name, rows: 4, placeholder: ph, spellcheck: 'false'}) : h('input', {name, placeholder: ph})));
    return h('div', {class: 'card'}, h('h3', null, 'New ' + kind), h('form', {id: 'acl-new-' + kind, onsubmit: (e) => {
      e.preventDefault();
      call('Create ' + kind, method, toBody(Object.fromEntries(els.map((el) => [el.name, el.value.trim()]))), after);
    }}, els, h('button', {type: 'submit'}, 'Create')));
  };
  const made = S.newToken;
  S.newToken = null;
  put(v.root,
    w ? null : h('p', {class: 'muted'}, 'Read only: this token may not write ACLs (acl:write).'),
    h('h2', null, 'Tokens'),
    table(['Accessor', 'Description', 'Policies', 'Roles', 'Service identities', 'Created', 'Expires', ''], tokens.map((t) => h('tr', {'data-accessor': t.accessorId},
      td(h('code', null, t.accessorId)), td(t.description || ''), joined(t.policies), joined(t.roles), td(ids(t.serviceIdentities)),
      td(time(t.createdAt)), td(time(t.expiresAt) || muted('never')), del('token', 'DeleteToken', 'accessorId', t.accessorId))), {id: 'acl-tokens'}),
    made ? h('div', {id: 'acl-secret', class: 'panel'}, h('p', null, 'Token ', h('code', null, made.accessorId), ' made. Its secret, shown only now:'),
      h('input', {id: 'acl-new-secret', readonly: true, value: made.secretId || '', size: 48})) : null,
    form('token', [['description', 'description'], ['policies', 'policies, comma separated'], ['roles', 'roles'],
      ['ids', 'service identities: ns/service'], ['ttl', 'ttl, e.g. 24h (empty: none)']], 'CreateToken', (x) => ({
      token: {description: x.description, policies: list(x.policies), roles: list(x.roles), serviceIdentities: parseIds(x.ids)},
      ...(x.ttl ? {ttl: x.ttl} : {}),
    }), (r) => { S.newToken = r.token; }),
    h('h2', null, 'Policies'),
    table(['Policy', 'Description', 'Rules', ''], policies.map((x) => h('tr', {'data-policy': x.name},
      td(h('code', null, x.name)), td(x.description || ''), td(h('pre', {class: 'rules'}, x.rules || '')),
      del('policy', 'DeletePolicy', 'name', x.name))), {id: 'acl-policies'}),
    form('policy', [['name', 'name'], ['description', 'description'], ['rules', 'one rule a line, e.g. write service prod/web']], 'PutPolicy', (x) => ({policy: x})),
    h('h2', null, 'Roles'),
    table(['Role', 'Description', 'Policies', 'Service identities', ''], roles.map((x) => h('tr', {'data-role': x.name},
      td(h('code', null, x.name)), td(x.description || ''), joined(x.policies), td(ids(x.serviceIdentities)),
      del('role', 'DeleteRole', 'name', x.name))), {id: 'acl-roles'}),
    form('role', [['name', 'name'], ['description', 'description'], ['policies', 'policies, comma separated'], ['ids', 'service identities: ns/service']], 'PutRole',
      (x) => ({role: {name: x.name, description: x.description, policies: list(x.policies), serviceIdentities: parseIds(x.ids)}})));
}

// ---- Cluster

async function pageCluster(v) {
  const out = h('div');
  put(v.root, h('h1', null, 'Cluster'), out);
  const owner = {};
  let first = true;
  await every(5000, async () => {
    try {
      const r = await api('RegistryService', 'ClusterStatus', {}, {signal: v.signal});
      clearError(owner);
      first = false;
      const alarms = r.alarms || [];
      fill(out,
        h('h2', null, 'Alarms'),
        alarms.length ? h('p', {id: 'alarms'}, alarms.map((a) => [pill(a, 'bad'), ' '])) : h('p', {id: 'alarms', class: 'muted'}, 'No alarms.'),
        h('h2', null, 'Beacon servers'),
        table(['Name', 'Addresses', ''], (r.servers || []).map((m) => h('tr', {'data-name': m.name || ''},
          td(m.name || ''), td((m.addresses || []).join(', ')), td(m.self ? pill('this server', 'good') : ''))), {id: 'servers'}),
        h('h2', null, 'etcd members'),
        table(['Name', 'Client URLs', 'Leader', 'Health', 'Error', 'DB size', 'Raft index', 'Version'], (r.etcd || []).map((m) => h('tr', {'data-name': m.name || '', class: m.healthy ? null : 'unhealthy'},
          td(m.name || ''), td((m.addresses || []).join(', ')), td(m.leader ? pill('leader', 'good') : ''),
          td(m.healthy ? pill('healthy', 'good') : pill('unhealthy', 'bad')), td(m.error || ''),
          td(m.dbSizeBytes ? fmtBytes(m.dbSizeBytes) : ''), td(m.raftIndex || ''), td(m.version || ''))), {id: 'etcd'}),
        h('p', {class: 'muted'}, `At revision ${r.revision || 0}; refreshed every 5 s.`));
    } catch (e) {
      if (e.name === 'AbortError') return false;
      showError(e, owner);
      if (first || ['permission_denied', 'unimplemented', 'unauthenticated'].includes(e.code)) return false;
    }
  }, v.signal);
}

// ---- Start: the shell is already painted; draw the page at once and ask
// who we are and which namespaces exist beside it.

function boot() {
  $('ns').addEventListener('change', (e) => {
    useNamespace(e.target.value);
    const [page, ...args] = parseRoute();
    // A page of one service or key belongs to the old namespace: go to the list.
    if ((page === 'services' || page === 'kv') && args.length) location.hash = '#/' + page;
    else route();
  });
  $('logout').addEventListener('click', () => {
    setToken('', null);
    S.aclEnabled = null;
    location.hash = '#/login';
    whoAmI();
  });
  window.addEventListener('hashchange', route);
  fillNamespaces([]);
  renderWho();
  route();
  whoAmI();
  loadNamespaces();
}

boot();
