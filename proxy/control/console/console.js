/* Proctor approvals console: vanilla JS, no dependencies, no external URLs.
 *
 * Security notes:
 * - Everything shown comes from agents (attacker-controlled): values are only
 *   ever put into the page with textContent / createElement, never as HTML.
 * - The approver token lives in sessionStorage (this tab only) and travels in
 *   the Authorization header; there are no cookies, so no CSRF exposure.
 * - Live updates: GET /v1/approvals/events read with fetch() and a stream
 *   reader (EventSource cannot send the Authorization header); if the stream
 *   fails, the console polls every 3 s and retries the stream with backoff.
 */
(function () {
  "use strict";

  var TOKEN_KEY = "proctor.approverToken";
  var POLL_MS = 3000;
  var TICK_MS = 10000;
  var KNOWN_STATES = ["pending", "approved", "denied", "expired", "forwarded"];

  var S = {
    token: null,
    me: null,
    filter: "pending",
    rows: new Map(), // id -> approval summary (inbox)
    fresh: new Set(), // ids that arrived live
    total: null,
    detailId: null,
    detail: null,
    busy: false,
    streamCtrl: null,
    streamRetryMs: 2000,
    retryTimer: null,
    pollTimer: null,
    tickTimer: null,
    view: null,
  };

  // ------------------------------------------------------------------ DOM helpers
  function $(id) {
    return document.getElementById(id);
  }

  function setText(node, value) {
    node.textContent = value === null || value === undefined ? "" : String(value);
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  /* el("td", {cls: "x", text: "y", data: {id: "1"}, attrs: {title: "t"}}, [children]) */
  function el(tag, opts, children) {
    var node = document.createElement(tag);
    opts = opts || {};
    if (opts.cls) node.className = opts.cls;
    if (opts.text !== undefined && opts.text !== null) node.textContent = String(opts.text);
    if (opts.data) {
      Object.keys(opts.data).forEach(function (k) {
        node.setAttribute("data-" + k, String(opts.data[k]));
      });
    }
    if (opts.attrs) {
      Object.keys(opts.attrs).forEach(function (k) {
        node.setAttribute(k, String(opts.attrs[k]));
      });
    }
    (children || []).forEach(function (c) {
      if (c !== null && c !== undefined) node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }

  function show(node, visible) {
    node.hidden = !visible;
  }

  function stateClass(state) {
    return KNOWN_STATES.indexOf(state) >= 0 ? "state-" + state : "state-other";
  }

  function badge(state) {
    return el("span", { cls: "badge " + stateClass(state), text: state || "?" });
  }

  // ------------------------------------------------------------------ formatting
  function formatDecimal(arg) {
    var m = /^(-?)(\d+)(?:\.(\d+))?$/.exec(String(arg));
    if (!m) return String(arg);
    var whole = m[2].replace(/\B(?=(\d{3})+(?!\d))/g, ",");
    var frac = (m[3] || "").replace(/0+$/, "");
    if (frac.length === 1) frac += "0";
    return m[1] + whole + (frac ? "." + frac : "");
  }

  function isPlainObject(v) {
    return v !== null && typeof v === "object" && !Array.isArray(v);
  }

  /* A Cedar JSON value as plain text, or null when it needs a structured rendering. */
  function cedarScalar(v) {
    if (v === null || v === undefined) return "\u2014";
    if (typeof v === "string") return v;
    if (typeof v === "number" || typeof v === "boolean") return String(v);
    if (isPlainObject(v)) {
      var keys = Object.keys(v);
      if (keys.length === 1 && keys[0] === "__extn" && isPlainObject(v.__extn)) {
        var fn = String(v.__extn.fn);
        var arg = v.__extn.arg;
        if (fn === "decimal") return formatDecimal(arg);
        if (fn === "datetime" || fn === "ip" || fn === "ipaddr" || fn === "duration") return String(arg);
        return fn + "(" + JSON.stringify(arg) + ")";
      }
      if (keys.length === 1 && keys[0] === "__entity" && isPlainObject(v.__entity)) {
        return String(v.__entity.type) + "::" + JSON.stringify(String(v.__entity.id));
      }
    }
    if (Array.isArray(v) && v.every(function (x) { return cedarScalar(x) !== null; })) {
      return v.length ? v.map(cedarScalar).join(", ") : "(none)";
    }
    return null;
  }

  /* A Cedar JSON value as a DOM node (text nodes only; records become nested tables). */
  function cedarNode(v) {
    var s = cedarScalar(v);
    if (s !== null) {
      var span = el("span", { cls: "value", text: s });
      if (isPlainObject(v) && v.__extn) span.setAttribute("title", String(v.__extn.fn) + '("' + String(v.__extn.arg) + '")');
      return span;
    }
    if (Array.isArray(v)) {
      return el("ul", { cls: "plain" }, v.map(function (x) { return el("li", {}, [cedarNode(x)]); }));
    }
    return kvTable(v);
  }

  function kvTable(obj, emptyText) {
    var keys = isPlainObject(obj) ? Object.keys(obj) : [];
    if (!keys.length) return el("p", { cls: "muted", text: emptyText || "(none)" });
    var tbody = el("tbody");
    keys.sort().forEach(function (k) {
      tbody.appendChild(el("tr", { data: { key: k } }, [el("th", { text: k }), el("td", {}, [cedarNode(obj[k])])]));
    });
    return el("table", { cls: "grid compact kv-table" }, [tbody]);
  }

  function relTime(iso, now) {
    var t = Date.parse(iso);
    if (isNaN(t)) return "\u2014";
    var secs = Math.round((t - now) / 1000);
    var future = secs > 0;
    var a = Math.abs(secs);
    var txt;
    if (a < 45) txt = a + " s";
    else if (a < 3600) txt = Math.round(a / 60) + " min";
    else if (a < 2 * 86400) txt = Math.round(a / 3600) + " h";
    else txt = Math.round(a / 86400) + " d";
    return future ? "in " + txt : txt + " ago";
  }

  function absTime(iso) {
    var t = Date.parse(iso);
    return isNaN(t) ? "\u2014" : new Date(t).toLocaleString();
  }

  /* A time cell that the ticker keeps current: mode "age" (3 min) or "rel" (in 5 min / 2 min ago). */
  function timeNode(iso, mode) {
    var span = el("span", { cls: "reltime", data: { ts: iso || "", mode: mode }, attrs: { title: iso ? absTime(iso) : "" } });
    renderTime(span, Date.now());
    return span;
  }

  function renderTime(span, now) {
    var iso = span.getAttribute("data-ts");
    if (!iso) return setText(span, "\u2014");
    var r = relTime(iso, now);
    setText(span, span.getAttribute("data-mode") === "age" ? r.replace(/ ago$/, "").replace(/^in /, "") : r);
  }

  function tick() {
    var now = Date.now();
    Array.prototype.forEach.call(document.querySelectorAll(".reltime"), function (s) { renderTime(s, now); });
  }

  function groupsText(groups) {
    if (Array.isArray(groups)) return groups.join(", ");
    if (!isPlainObject(groups)) return "";
    return Object.keys(groups).sort().map(function (g) {
      var n = groups[g];
      return typeof n === "number" && n > 1 ? g + " (" + n + " approvers)" : g;
    }).join(", ");
  }

  // ------------------------------------------------------------------ API
  function ApiError(status, problem, fallback) {
    this.status = status;
    this.problem = problem;
    var title = problem && typeof problem.title === "string" ? problem.title : "";
    var detail = problem && typeof problem.detail === "string" ? problem.detail : "";
    this.message = title && detail ? title + ": " + detail : (title || detail || fallback || "HTTP " + status);
  }

  function api(method, path, body) {
    var headers = { Authorization: "Bearer " + S.token, Accept: "application/json" };
    var init = { method: method, headers: headers, cache: "no-store", credentials: "omit", redirect: "error" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(path, init).then(
      function (resp) {
        return resp.text().then(function (raw) {
          var data = null;
          try {
            data = raw ? JSON.parse(raw) : null;
          } catch (e) {
            data = null;
          }
          if (!resp.ok) throw new ApiError(resp.status, data, "the control API answered " + resp.status);
          return data;
        });
      },
      function () {
        throw new ApiError(0, null, "cannot reach the control API");
      }
    );
  }

  function authFailed(e) {
    if (e instanceof ApiError && e.status === 401 && S.token) {
      signOut("Signed out: " + e.message);
      return true;
    }
    return false;
  }

  // ------------------------------------------------------------------ views and routing
  function setView(name) {
    S.view = name;
    show($("login-view"), name === "login");
    show($("inbox-view"), name === "inbox");
    show($("detail-view"), name === "detail");
    show($("session"), name !== "login");
  }

  function detailIdFromPath() {
    var m = /^\/console\/approvals\/([^/]+)$/.exec(location.pathname);
    if (!m) return null;
    try {
      return decodeURIComponent(m[1]);
    } catch (e) {
      return null;
    }
  }

  function navigate(path) {
    if (location.pathname !== path) history.pushState(null, "", path);
    route();
  }

  function route() {
    if (!S.token) {
      setView("login");
      return;
    }
    var id = detailIdFromPath();
    if (id) openDetail(id);
    else openInbox();
  }

  // ------------------------------------------------------------------ login / logout
  function showLoginError(msg) {
    var p = $("login-error");
    setText(p, msg);
    show(p, !!msg);
  }

  function login(ev) {
    ev.preventDefault();
    var tok = $("token").value.replace(/^\s*Bearer\s+/i, "").replace(/\s+/g, "");
    if (!tok) {
      showLoginError("Paste an approver token first.");
      return;
    }
    if (!/^[A-Za-z0-9_\-.=]+$/.test(tok)) {
      showLoginError("That does not look like a token (a JWT: three base64url parts separated by dots).");
      return;
    }
    $("login").disabled = true;
    S.token = tok;
    api("GET", "/v1/whoami").then(
      function (me) {
        $("login").disabled = false;
        $("token").value = "";
        showLoginError("");
        sessionStorage.setItem(TOKEN_KEY, tok);
        signedIn(me);
      },
      function (e) {
        $("login").disabled = false;
        S.token = null;
        showLoginError(e.message || "Sign-in failed.");
      }
    );
  }

  function signedIn(me) {
    S.me = me;
    var groups = me && Array.isArray(me.groups) ? me.groups : [];
    setText($("whoami"), (me && me.approver ? me.approver : "?") + (groups.length ? " \u00b7 " + groups.join(", ") : ""));
    startStream();
    if (!S.tickTimer) S.tickTimer = setInterval(tick, TICK_MS);
    route();
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    S.token = null;
    S.me = null;
    stopStream();
    stopPolling();
    if (S.tickTimer) clearInterval(S.tickTimer);
    S.tickTimer = null;
    S.rows = new Map();
    S.fresh = new Set();
    S.detail = null;
    S.detailId = null;
    clear($("approval-rows"));
    resetDetail();
    setText($("whoami"), "");
    setLive("off");
    if (location.pathname !== "/console/") history.replaceState(null, "", "/console/");
    showLoginError(message || "");
    setView("login");
    $("token").focus();
  }

  // ------------------------------------------------------------------ inbox
  function matchesFilter(a) {
    return S.filter === "all" || a.state === S.filter;
  }

  function openInbox() {
    S.detailId = null;
    S.detail = null;
    setView("inbox");
    loadInbox();
  }

  function loadInbox() {
    var q = S.filter === "all" ? "" : "state=" + encodeURIComponent(S.filter) + "&";
    var filter = S.filter;
    return api("GET", "/v1/approvals?" + q + "limit=200").then(
      function (data) {
        if (filter !== S.filter) return;
        show($("inbox-error"), false);
        var rows = new Map();
        (data && Array.isArray(data.approvals) ? data.approvals : []).forEach(function (a) {
          if (a && typeof a.id === "string") rows.set(a.id, a);
        });
        var total = data && typeof data.total === "number" ? data.total : null;
        // Polling re-reads the list every 3 s: leave the DOM alone when nothing changed.
        var sig = JSON.stringify([total, Array.from(rows.values())]);
        var current = JSON.stringify([S.total, Array.from(S.rows.values())]);
        S.rows = rows;
        S.total = total;
        if (sig !== current || !$("approval-rows").firstChild) renderInbox();
      },
      function (e) {
        if (authFailed(e)) return;
        setText($("inbox-error"), "Could not load approvals: " + e.message);
        show($("inbox-error"), true);
      }
    );
  }

  function renderInbox() {
    var tbody = $("approval-rows");
    clear(tbody);
    var items = Array.from(S.rows.values()).sort(function (a, b) {
      return String(b.created_at).localeCompare(String(a.created_at));
    });
    items.forEach(function (a) {
      tbody.appendChild(inboxRow(a));
    });
    show($("inbox-empty"), items.length === 0);
    var shown = items.filter(matchesFilter).length;
    setText($("inbox-count"), S.total !== null && S.total > shown ? shown + " of " + S.total : shown + (shown === 1 ? " approval" : " approvals"));
  }

  function inboxRow(a) {
    var link = el("a", { text: a.action || "(unknown action)", attrs: { href: "/console/approvals/" + encodeURIComponent(a.id) } });
    link.addEventListener("click", function (ev) {
      if (ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.altKey) return;
      ev.preventDefault();
      navigate("/console/approvals/" + encodeURIComponent(a.id));
    });
    var cls = "approval-row";
    if (!matchesFilter(a)) cls += " is-stale";
    if (S.fresh.has(a.id)) cls += " is-new";
    var tr = el("tr", { cls: cls, data: { id: a.id, state: a.state, testid: "approval-row" }, attrs: { tabindex: "0" } }, [
      el("td", { cls: "agent", text: a.agent }),
      el("td", { cls: "action" }, [link]),
      el("td", { cls: "resource", text: a.resource }),
      el("td", { cls: "groups", text: groupsText(a.groups) }),
      el("td", { cls: "age" }, [timeNode(a.created_at, "age")]),
      el("td", { cls: "expires" }, [a.state === "pending" || a.state === "approved" ? timeNode(a.expires_at, "rel") : el("span", { cls: "muted", text: "\u2014" })]),
      el("td", { cls: "state" }, [badge(a.state)]),
    ]);
    tr.addEventListener("click", function (ev) {
      if (ev.target && ev.target.closest && ev.target.closest("a")) return;
      navigate("/console/approvals/" + encodeURIComponent(a.id));
    });
    tr.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter") navigate("/console/approvals/" + encodeURIComponent(a.id));
    });
    return tr;
  }

  // ------------------------------------------------------------------ detail
  function resetDetail() {
    ["detail-action", "req-method", "req-url", "req-body", "req-body-note", "cannot-decide"].forEach(function (id) {
      setText($(id), "");
    });
    setText($("detail-state"), "");
    $("detail-state").className = "badge";
    ["summary", "derived", "derived-attributes", "derived-fields", "derived-params", "policies"].forEach(function (id) {
      clear($(id));
    });
    clear($("req-headers").tBodies[0]);
    clear($("votes").tBodies[0]);
    $("reason").value = "";
    show($("decide-form"), false);
    show($("cannot-decide"), false);
    show($("req-body-note"), false);
    show($("votes-empty"), false);
    showError("");
    showNotice("");
    show($("detail-load-error"), false);
  }

  function openDetail(id) {
    if (S.detailId !== id) {
      resetDetail();
      S.detailId = id;
      S.detail = null;
    }
    setView("detail");
    refreshDetail();
  }

  function refreshDetail() {
    var id = S.detailId;
    if (!id) return Promise.resolve();
    return api("GET", "/v1/approvals/" + encodeURIComponent(id)).then(
      function (a) {
        if (S.detailId !== id || !a) return;
        show($("detail-load-error"), false);
        S.detail = a;
        renderDetail(a);
      },
      function (e) {
        if (S.detailId !== id || authFailed(e)) return;
        setText($("detail-load-error"), e.status === 404 ? "There is no approval " + id + "." : "Could not load the approval: " + e.message);
        show($("detail-load-error"), true);
      }
    );
  }

  function dlRow(dl, label, value, key) {
    var dd = el("dd", { data: { key: key || label } });
    if (value instanceof Node) dd.appendChild(value);
    else setText(dd, value === null || value === undefined || value === "" ? "\u2014" : value);
    dl.appendChild(el("dt", { text: label }));
    dl.appendChild(dd);
  }

  function renderDetail(a) {
    setText($("detail-action"), a.action);
    var st = $("detail-state");
    setText(st, a.state);
    st.className = "badge " + stateClass(a.state);
    st.setAttribute("data-state", String(a.state));

    // summary
    var sum = $("summary");
    clear(sum);
    dlRow(sum, "Approval", a.id, "id");
    dlRow(sum, "Agent", a.agent, "agent");
    dlRow(sum, "Action", a.action, "action");
    dlRow(sum, "Resource", a.resource, "resource");
    dlRow(sum, "Connector", a.connector, "connector");
    dlRow(sum, "Approving groups", groupsText(a.groups), "groups");
    dlRow(sum, "Requested", el("span", {}, [timeNode(a.created_at, "rel"), " (" + absTime(a.created_at) + ")"]), "created_at");
    dlRow(sum, "Expires", el("span", {}, [timeNode(a.expires_at, "rel"), " (" + absTime(a.expires_at) + ")"]), "expires_at");
    dlRow(sum, "Agent waits", a.mode === "async" ? "asynchronously (retries later)" : "synchronously (connection held open)", "mode");
    if (a.escalated) dlRow(sum, "Escalated", "yes", "escalated");
    if (a.decided_by) dlRow(sum, "Decided by", a.decided_by, "decided_by");
    if (a.decided_at) dlRow(sum, "Decided", absTime(a.decided_at), "decided_at");
    if (a.reason) dlRow(sum, "Reason", a.reason, "reason");
    if (a.forwarded_at) dlRow(sum, "Forwarded", absTime(a.forwarded_at), "forwarded_at");
    dlRow(sum, "Decision record", a.decision_id, "decision_id");

    // the request
    var req = isPlainObject(a.request) ? a.request : {};
    setText($("req-method"), req.method || a.method);
    setText($("req-url"), req.url || a.url);
    var htb = $("req-headers").tBodies[0];
    clear(htb);
    var headers = isPlainObject(req.headers) ? req.headers : {};
    var hkeys = Object.keys(headers);
    if (!hkeys.length) htb.appendChild(el("tr", {}, [el("td", { cls: "muted", text: "(no headers)" })]));
    hkeys.forEach(function (k) {
      var v = headers[k];
      htb.appendChild(el("tr", {}, [el("th", { text: k }), el("td", { text: Array.isArray(v) ? v.join(", ") : v })]));
    });
    var body = typeof req.body === "string" ? req.body : null;
    setText($("req-body"), body === null ? "(no body)" : body);
    $("req-body").classList.toggle("muted", body === null);
    var note = "";
    if (req.body_truncated) note = "The body is cut off here; the agent sent " + (req.body_bytes || "more") + " bytes.";
    setText($("req-body-note"), note);
    show($("req-body-note"), !!note);

    // derived
    var d = isPlainObject(a.derived) ? a.derived : {};
    var ddl = $("derived");
    clear(ddl);
    dlRow(ddl, "Action", d.action, "action");
    dlRow(ddl, "Resource", d.resource, "resource");
    if (d.connector) dlRow(ddl, "Connector", d.connector, "connector");
    if (d.risk) dlRow(ddl, "Risk", d.risk, "risk");
    if (d.route) dlRow(ddl, "Route", typeof d.route === "string" ? d.route : cedarNode(d.route), "route");
    var attrs = $("derived-attributes");
    clear(attrs);
    attrs.appendChild(kvTable(d.resource_attributes, "(no attributes)"));
    var ctx = isPlainObject(d.context) ? d.context : {};
    var fields = $("derived-fields");
    clear(fields);
    fields.appendChild(kvTable(ctx.fields, "(no fields)"));
    if (ctx.rpc) {
      fields.appendChild(el("h5", { text: "JSON-RPC" }));
      fields.appendChild(cedarNode(ctx.rpc));
    }
    var params = $("derived-params");
    clear(params);
    var merged = {};
    if (isPlainObject(ctx.params)) Object.keys(ctx.params).forEach(function (k) { merged["path: " + k] = ctx.params[k]; });
    if (isPlainObject(ctx.query_params)) Object.keys(ctx.query_params).forEach(function (k) { merged["query: " + k] = ctx.query_params[k]; });
    params.appendChild(kvTable(merged, "(none)"));

    // policies
    var pol = $("policies");
    clear(pol);
    var pids = Array.isArray(a.policies) ? a.policies : Array.isArray(d.policies) ? d.policies : [];
    if (!pids.length) pol.appendChild(el("li", { cls: "muted", text: "(none recorded)" }));
    pids.forEach(function (p) {
      pol.appendChild(el("li", {}, [el("code", { text: p })]));
    });

    // votes
    var vtb = $("votes").tBodies[0];
    clear(vtb);
    var votes = Array.isArray(a.votes) ? a.votes : [];
    votes.forEach(function (v) {
      vtb.appendChild(el("tr", { cls: "vote", data: { decision: v.decision } }, [
        el("td", { text: v.approver }),
        el("td", {}, [el("span", { cls: "badge " + (v.decision === "approve" ? "state-approved" : "state-denied"), text: v.decision })]),
        el("td", { text: Array.isArray(v.groups) ? v.groups.join(", ") : v.groups }),
        el("td", { text: v.reason }),
        el("td", { text: absTime(v.at) }),
      ]));
    });
    show($("votes"), votes.length > 0);
    show($("votes-empty"), votes.length === 0);

    // deciding
    var may = a.you_may_decide === true;
    show($("decide-form"), may);
    var cannot = $("cannot-decide");
    setText(cannot, may ? "" : "You cannot decide this: " + whyNot(a) + ".");
    show(cannot, !may);
  }

  function whyNot(a) {
    var me = S.me || {};
    if (a.state !== "pending") return "it is already " + a.state + (a.decided_by ? " (by " + a.decided_by + ")" : "");
    if (me.approver && a.agent === me.approver) return "nobody approves their own request";
    if ((a.votes || []).some(function (v) { return v.approver === me.approver; })) return "you have already voted; it waits for other approvers";
    var mine = Array.isArray(me.groups) ? me.groups : [];
    var needed = isPlainObject(a.groups) ? Object.keys(a.groups) : [];
    if (!needed.some(function (g) { return mine.indexOf(g) >= 0; }))
      return "you are not in an approving group for it (needs " + (needed.join(" or ") || "a group") + ")";
    return "the approvals API does not allow you to";
  }

  function showError(msg) {
    setText($("error"), msg);
    show($("error"), !!msg);
  }

  function showNotice(msg) {
    setText($("detail-notice"), msg);
    show($("detail-notice"), !!msg);
  }

  function decide(kind) {
    var id = S.detailId;
    if (!id || S.busy) return;
    var reason = $("reason").value.trim();
    showError("");
    if (!reason) {
      showError("A reason is required to " + kind + " (it is recorded with your decision).");
      $("reason").focus();
      return;
    }
    S.busy = true;
    $("approve").disabled = true;
    $("deny").disabled = true;
    api("POST", "/v1/approvals/" + encodeURIComponent(id) + "/" + kind, { reason: reason }).then(
      function (a) {
        if (S.detailId !== id) return;
        $("reason").value = "";
        showNotice(kind === "approve" ? "You approved this request." : "You denied this request.");
        if (a) renderDetail(Object.assign({}, a, { you_may_decide: false }));
        return refreshDetail();
      },
      function (e) {
        if (authFailed(e)) return;
        if (S.detailId !== id) return;
        showError(e.message);
        if (e.status === 409) refreshDetail();
      }
    ).then(function () {
      S.busy = false;
      $("approve").disabled = false;
      $("deny").disabled = false;
    });
  }

  // ------------------------------------------------------------------ live updates
  function setLive(mode) {
    var n = $("live-status");
    n.setAttribute("data-state", mode);
    setText(n, { live: "live", connecting: "connecting\u2026", polling: "polling", off: "offline" }[mode] || mode);
    n.setAttribute("title", mode === "polling" ? "The live stream is unavailable; refreshing every 3 s" : "Live updates");
  }

  function onApprovalEvent(msg) {
    var a = msg && msg.approval;
    if (!isPlainObject(a) || typeof a.id !== "string") return;
    if (S.view === "inbox") {
      if (S.rows.has(a.id) || matchesFilter(a)) {
        if (!S.rows.has(a.id)) {
          S.fresh.add(a.id);
          if (S.total !== null) S.total += 1;
        }
        S.rows.set(a.id, a);
        renderInbox();
      }
    } else if (S.rows.has(a.id) || matchesFilter(a)) {
      S.rows.set(a.id, a); // keep the inbox current for when we go back
    }
    if (S.detailId === a.id) refreshDetail();
  }

  function refreshCurrent() {
    if (!S.token) return;
    if (S.view === "inbox") loadInbox();
    else if (S.view === "detail") refreshDetail();
  }

  function startPolling() {
    if (!S.pollTimer) S.pollTimer = setInterval(refreshCurrent, POLL_MS);
  }

  function stopPolling() {
    if (S.pollTimer) clearInterval(S.pollTimer);
    S.pollTimer = null;
  }

  function stopStream() {
    if (S.retryTimer) clearTimeout(S.retryTimer);
    S.retryTimer = null;
    if (S.streamCtrl) S.streamCtrl.abort();
    S.streamCtrl = null;
  }

  function handleBlock(block) {
    var event = "message";
    var data = [];
    block.split(/\r\n|\r|\n/).forEach(function (line) {
      if (!line || line.charAt(0) === ":") return;
      var i = line.indexOf(":");
      var field = i < 0 ? line : line.slice(0, i);
      var value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    });
    if (event !== "approval" || !data.length) return;
    try {
      onApprovalEvent(JSON.parse(data.join("\n")));
    } catch (e) {
      /* a malformed event is ignored */
    }
  }

  function startStream() {
    stopStream();
    if (!S.token) return;
    var ctrl = new AbortController();
    S.streamCtrl = ctrl;
    setLive(S.pollTimer ? "polling" : "connecting");
    fetch("/v1/approvals/events", {
      headers: { Authorization: "Bearer " + S.token, Accept: "text/event-stream" },
      signal: ctrl.signal,
      cache: "no-store",
      credentials: "omit",
    })
      .then(function (resp) {
        if (resp.status === 401) {
          return resp.json().catch(function () { return null; }).then(function (p) {
            if (S.streamCtrl === ctrl) signOut("Signed out: " + new ApiError(401, p).message);
          });
        }
        if (!resp.ok || !resp.body) throw new Error("HTTP " + resp.status);
        setLive("live");
        stopPolling();
        S.streamRetryMs = 2000;
        refreshCurrent(); // catch up on anything missed while disconnected
        var reader = resp.body.getReader();
        var decoder = new TextDecoder();
        var buf = "";
        function pump() {
          return reader.read().then(function (r) {
            if (r.done) throw new Error("stream ended");
            buf += decoder.decode(r.value, { stream: true });
            var m;
            while ((m = /\r\n\r\n|\n\n|\r\r/.exec(buf))) {
              handleBlock(buf.slice(0, m.index));
              buf = buf.slice(m.index + m[0].length);
            }
            return pump();
          });
        }
        return pump();
      })
      .catch(function () {
        if (ctrl.signal.aborted || S.streamCtrl !== ctrl || !S.token) return;
        setLive("polling");
        startPolling();
        refreshCurrent();
        var wait = S.streamRetryMs;
        S.streamRetryMs = Math.min(S.streamRetryMs * 2, 60000);
        S.retryTimer = setTimeout(function () {
          if (S.streamCtrl === ctrl && S.token) startStream();
        }, wait);
      });
  }

  // ------------------------------------------------------------------ wiring
  function init() {
    $("login-form").addEventListener("submit", login);
    $("signout").addEventListener("click", function () { signOut(""); });
    $("back").addEventListener("click", function () { navigate("/console/"); });
    $("state-filter").addEventListener("change", function (ev) {
      S.filter = ev.target.value;
      S.rows = new Map();
      S.fresh = new Set();
      S.total = null;
      renderInbox();
      loadInbox();
    });
    $("approve").addEventListener("click", function () { decide("approve"); });
    $("deny").addEventListener("click", function () { decide("deny"); });
    $("reason").addEventListener("input", function () { if ($("reason").value.trim()) showError(""); });
    window.addEventListener("popstate", route);

    var saved = sessionStorage.getItem(TOKEN_KEY);
    if (!saved) {
      setView("login");
      return;
    }
    S.token = saved;
    api("GET", "/v1/whoami").then(signedIn, function (e) {
      if (e.status === 401) signOut("Signed out: " + e.message);
      else {
        S.token = null;
        setView("login");
        showLoginError("Cannot reach the control API: " + e.message);
      }
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
