/*! EventFlow tracker. Fire-and-forget: never throws into the page, never delays navigation.
 *
 * <script async src="https://collect.example.com/v1/tracker.js" data-client="acme"></script>
 *
 * Attributes of the script tag (all optional but data-client):
 *   data-client      client id
 *   data-endpoint    collector origin (default: the origin the script was loaded from)
 *   data-page        landing | webinar | live (default: detected from the URL)
 *   data-event-id    event id of a landing page (default: the {path} of /event/{path})
 *   data-webinar-id  webinar id (default: the {id} of /webinar/{id}[/live])
 *   data-ping-interval  milliseconds between live pings (default 30000, at least 1000)
 *
 * API: eventflow.entry({entry_id, event_id | webinar_id, session_id?, utm?, cid?})
 *      eventflow.visit()  re-sends a visit for the current URL
 * A client-side navigation to another path (history.pushState/replaceState, back/forward) is a
 * new visit; a fragment change (#anchor) is not. Live pages ping at once, then every interval
 * while document.visibilityState is "visible", and once more when they become visible again.
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
  var PING_MS = Math.max(1000, parseInt(attr("data-ping-interval"), 10) || 30000);
  var pingTimer = null, lastPath = null;
  var queued = [];
  try { if (w.eventflow && w.eventflow.q && w.eventflow.q.length) queued = w.eventflow.q.slice(); } catch (e) {}

  function uid() {
    try { if (w.crypto && w.crypto.randomUUID) return w.crypto.randomUUID(); } catch (e) {}
    return Date.now().toString(36) + "-" + Math.random().toString(36).slice(2) + Math.random().toString(36).slice(2);
  }

  function send(fact) {
    try {
      if (!client) return;
      fact.client_id = client;
      fact.ts = new Date().toISOString();
      var body = JSON.stringify(fact);
      var queued = false;
      try { queued = !!(w.navigator.sendBeacon && w.navigator.sendBeacon(url, body)); } catch (e) { queued = false; }
      if (!queued && w.fetch) {
        w.fetch(url, { method: "POST", body: body, keepalive: true, credentials: "include", mode: "cors",
          headers: { "Content-Type": "text/plain" } }).catch(function () {});
      }
    } catch (e) { /* tracking must never break the page */ }
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
    else if ((m = path.match(/^\/event\/(.+?)\/?$/))) { kind = kind || "landing"; eventId = eventId || decodeURIComponent(m[1]); }
    return { kind: kind, eventId: eventId, webinarId: webinarId, path: path };
  }

  function visit() {
    try {
      var p = page();
      lastPath = p.path;
      if (!p.kind) { schedulePings(p); return; }
      var q = query();
      var f = { type: "visit", page: p.kind, path: p.path, event_uid: uid() };
      if (p.eventId) f.event_id = p.eventId;
      if (p.webinarId) f.webinar_id = p.webinarId;
      if (Object.keys(q.utm).length) f.utm = q.utm;
      if (q.cid) f.cid = q.cid;
      try { if (d.referrer) f.referrer = d.referrer; } catch (e) {}
      send(f);
      schedulePings(p);
    } catch (e) {}
  }

  function schedulePings(p) {
    try {
      if (pingTimer) { clearInterval(pingTimer); pingTimer = null; }
      if (p.kind !== "live" || !p.webinarId) return;
      var ping = function () {
        try { if (d.visibilityState === "visible") send({ type: "ping", webinar_id: p.webinarId }); } catch (e) {}
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
      send(f);
    } catch (e) {}
    return true;
  }

  try {
    d.addEventListener("visibilitychange", function () {
      try { if (d.visibilityState === "visible") { var p = page(); if (p.kind === "live") send({ type: "ping", webinar_id: p.webinarId }); } } catch (e) {}
    });
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
  visit();
  for (var i = 0; i < queued.length; i++) {
    try { if (queued[i] && queued[i][0] === "entry") entry(queued[i][1]); } catch (e) {}
  }
})(typeof window !== "undefined" ? window : null, typeof document !== "undefined" ? document : null);
