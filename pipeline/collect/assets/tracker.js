/*! EventFlow tracker. Fire-and-forget: never throws into the page, never delays navigation.
 *
 * <script async src="https://collect.example.com/v1/tracker.js" data-client="acme"></script>
 *
 * Attributes of the script tag (all optional but data-client):
 *   data-client      client id
 *   data-endpoint    collector origin (default: the origin the script was loaded from)
 *   data-page        landing | webinar | live (default: detected from the URL)
 *   data-event-id    event id of a landing page (default: the first segment of /event/{path}; sub-pages such
 *                    as /event/{path}/register count as views of that event's landing pages)
 *   data-webinar-id  webinar id (default: the {id} of /webinar/{id}[/live])
 *   data-ping-interval  milliseconds between live pings (default 30000, at least 1000)
 *
 * API: eventflow.entry({entry_id, event_id | webinar_id, session_id?, utm?, cid?})
 *      eventflow.visit()  re-sends a visit for the current URL
 * A client-side navigation to another path (history.pushState/replaceState, back/forward) is a
 * new visit; a fragment change (#anchor) is not. Live pages ping at once, then every interval
 * while document.visibilityState is "visible", and once more when they become visible again.
 * On a page's first visit, pings and entries are sent once the collector has answered it (so a
 * fresh browser has its ef_sid cookie), after 2 s at most, and at once when the page is left.
 *
 * Sessions: the collector answers the page's first visit with the session it used
 * ("session_id", and its lifetime "session_ttl_ms"). The page names that session in the body of
 * every later fact, so a registration after a long read, or pings after the tab was hidden for
 * long, keep the page's session although the ef_sid cookie has expired meanwhile (the collector
 * then renews the cookie with it). The session is also kept in sessionStorage with the time the
 * tab last sent a beacon or left a page: the next page of the same tab continues it when that
 * was less than the session lifetime ago (a visitor who read a page for an hour and clicks on to
 * the registration page stays one session). An explicit session_id in eventflow.entry wins.
 *
 * Pages that load this script async may call eventflow.entry before it arrives, or when it
 * cannot load at all, through this stub (queued calls are sent when the tracker loads):
 *   <script>window.eventflow=window.eventflow||{q:[],entry:function(f){window.eventflow.q.push(["entry",f])}};</script>
 */
(function (w, d) {
  "use strict";
  if (!w || !d || (w.eventflow && w.eventflow.__loaded)) return;
  var script = d.currentScript || (function () {
    try { var s = d.querySelectorAll("script[data-client]"); return s[s.length - 1]; } catch (e) { return null; }
  })();
  function attr(name) { try { return script ? script.getAttribute(name) : null; } catch (e) { return null; } }
  var client = attr("data-client");
  var endpoint = attr("data-endpoint");
  try { if (!endpoint && script && script.src) endpoint = new URL(script.src, w.location.href).origin; } catch (e) {}
  var url = String(endpoint || "").replace(/\/+$/, "") + "/v1/collect";
  var PING_MS = Math.max(1000, parseInt(attr("data-ping-interval"), 10) || 30000), HOLD_MS = 2000;
  var pingTimer = null, lastPath = null;
  var queued = [];
  var SESSION_KEY = "eventflow_session", session = null, sessionTtl = 30 * 60 * 1000;
  try { if (w.eventflow && w.eventflow.q && w.eventflow.q.length) queued = w.eventflow.q.slice(); } catch (e) {}

  function uid() {
    try { if (w.crypto && w.crypto.randomUUID) return w.crypto.randomUUID(); } catch (e) {}
    return Date.now().toString(36) + "-" + Math.random().toString(36).slice(2) + Math.random().toString(36).slice(2);
  }

  // The page's session (see the header): remembered for the tab in sessionStorage, with the
  // time of the tab's last beacon or page exit.
  function keepSession() {
    try {
      if (session && w.sessionStorage) {
        w.sessionStorage.setItem(SESSION_KEY, JSON.stringify({ id: session, ttl: sessionTtl, at: Date.now() }));
      }
    } catch (e) {}
  }
  function restoreSession() {
    try {
      var s = JSON.parse(w.sessionStorage.getItem(SESSION_KEY) || "null");
      if (s && typeof s.id === "string" && s.id && typeof s.ttl === "number" && typeof s.at === "number" &&
          Date.now() - s.at < s.ttl) { session = s.id; sessionTtl = s.ttl; }
    } catch (e) {}
  }
  // The collector's answer to the page's first visit names the session it used.
  function learnSession(answer) {
    try {
      if (answer && typeof answer.session_id === "string" && answer.session_id && answer.session_id.length <= 128) {
        session = answer.session_id;
        if (typeof answer.session_ttl_ms === "number" && answer.session_ttl_ms > 0) sessionTtl = answer.session_ttl_ms;
        keepSession();
      }
    } catch (e) {}
  }

  // Sends one fact: sendBeacon, else fetch keepalive. With `answered`, fetch is preferred and
  // `answered` runs once the collector's answer has been read (or the request failed).
  function send(fact, answered) {
    try {
      if (!client) { if (answered) answered(); return; }
      fact.client_id = client;
      if (!fact.ts) fact.ts = new Date().toISOString();
      if (!fact.session_id && session) fact.session_id = session;
      keepSession();
      var body = JSON.stringify(fact);
      var opts = { method: "POST", body: body, keepalive: true, credentials: "include", mode: "cors",
        headers: { "Content-Type": "text/plain" } };
      if (answered && w.fetch) {
        w.fetch(url, opts).then(function (r) { return r.json().then(learnSession); }).then(answered, answered);
        return;
      }
      var sent = false;
      try { sent = !!(w.navigator.sendBeacon && w.navigator.sendBeacon(url, body)); } catch (e) { sent = false; }
      if (!sent && w.fetch) w.fetch(url, opts).catch(function () {});
      if (answered) answered();
    } catch (e) { /* tracking must never break the page */ try { if (answered) answered(); } catch (e2) {} }
  }

  // A fresh browser has no ef_sid until the collector answers the first visit (it creates
  // sessions for visits only): pings and entries wait for that answer, at most HOLD_MS and
  // never past pagehide, so that they carry the session cookie.
  var ready = false, held = [];
  function release() {
    if (ready) return;
    ready = true;
    var h = held; held = [];
    for (var i = 0; i < h.length; i++) send(h[i]);
  }
  function track(fact) {
    try {
      if (!fact.ts) fact.ts = new Date().toISOString();
      if (ready) send(fact); else held.push(fact);
    } catch (e) {}
  }

  function query() {
    var out = { utm: {}, cid: null };
    try {
      var p = new URLSearchParams(w.location.search);
      ["source", "medium", "campaign", "term", "content"].forEach(function (k) {
        var v = p.get("utm_" + k); if (v) out.utm[k] = v;
      });
      out.cid = p.get("cid") || p.get("ef_cid");
    } catch (e) {}
    return out;
  }

  function page() {
    var kind = attr("data-page"), eventId = attr("data-event-id"), webinarId = attr("data-webinar-id");
    var path = "";
    try { path = w.location.pathname || ""; } catch (e) {}
    var m;
    if ((m = path.match(/^\/webinar\/([^\/]+)\/live\/?$/))) { kind = kind || "live"; webinarId = webinarId || decodeURIComponent(m[1]); }
    else if ((m = path.match(/^\/webinar\/([^\/]+)\/?$/))) { kind = kind || "webinar"; webinarId = webinarId || decodeURIComponent(m[1]); }
    else if ((m = path.match(/^\/event\/([^\/]+)(?:\/.*)?$/))) { kind = kind || "landing"; eventId = eventId || decodeURIComponent(m[1]); }
    return { kind: kind, eventId: eventId, webinarId: webinarId, path: path };
  }

  function visit() {
    try {
      var p = page();
      lastPath = p.path;
      if (!p.kind) { schedulePings(p); release(); return; }
      var q = query();
      var f = { type: "visit", page: p.kind, path: p.path, event_uid: uid() };
      if (p.eventId) f.event_id = p.eventId;
      if (p.webinarId) f.webinar_id = p.webinarId;
      if (Object.keys(q.utm).length) f.utm = q.utm;
      if (q.cid) f.cid = q.cid;
      try { if (d.referrer) f.referrer = d.referrer; } catch (e) {}
      if (ready) send(f); else { send(f, release); setTimeout(release, HOLD_MS); }
      schedulePings(p);
    } catch (e) {}
  }

  function schedulePings(p) {
    try {
      if (pingTimer) { clearInterval(pingTimer); pingTimer = null; }
      if (p.kind !== "live" || !p.webinarId) return;
      var ping = function () {
        try { if (d.visibilityState === "visible") track({ type: "ping", webinar_id: p.webinarId }); } catch (e) {}
      };
      ping();
      pingTimer = setInterval(ping, PING_MS);
    } catch (e) {}
  }

  function entry(fields) {
    try {
      var f = { type: "entry" };
      var src = fields || {};
      for (var k in src) { if (Object.prototype.hasOwnProperty.call(src, k)) f[k] = src[k]; }
      if (!f.event_id && !f.webinar_id) {
        var p = page();
        if (p.eventId) f.event_id = p.eventId;
        if (p.webinarId) f.webinar_id = p.webinarId;
      }
      var q = query();
      if (!f.utm && Object.keys(q.utm).length) f.utm = q.utm;
      if (!f.cid && q.cid) f.cid = q.cid;
      track(f);
    } catch (e) {}
    return true;
  }

  try {
    d.addEventListener("visibilitychange", function () {
      try {
        if (d.visibilityState === "visible") { var p = page(); if (p.kind === "live") track({ type: "ping", webinar_id: p.webinarId }); }
        else keepSession();
      } catch (e) {}
    });
    w.addEventListener("pagehide", function () { try { keepSession(); release(); } catch (e) {} });
    // Single-page apps: a client-side navigation is a new page view.
    ["pushState", "replaceState"].forEach(function (name) {
      var orig = w.history && w.history[name];
      if (typeof orig !== "function") return;
      w.history[name] = function () {
        var before = w.location.pathname;
        var result = orig.apply(this, arguments);
        try { if (w.location.pathname !== before) setTimeout(visit, 0); } catch (e) {}
        return result;
      };
    });
    // popstate also fires for a #fragment change on the same page: not a new page view.
    w.addEventListener("popstate", function () {
      setTimeout(function () { try { if (w.location.pathname !== lastPath) visit(); } catch (e) {} }, 0);
    });
  } catch (e) {}

  try { w.eventflow = { __loaded: true, entry: entry, visit: visit }; } catch (e) {}
  restoreSession();
  visit();
  for (var i = 0; i < queued.length; i++) {
    try { if (queued[i] && queued[i][0] === "entry") entry(queued[i][1]); } catch (e) {}
  }
})(typeof window !== "undefined" ? window : null, typeof document !== "undefined" ? document : null);
