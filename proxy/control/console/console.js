/* Proctor console (approvals, activity, agents, claims, handoffs, duplicates, workflows, workflow inbox, budgets): vanilla JS, no dependencies, no external URLs.
 *
 * Security notes:
 * - Everything shown comes from agents (attacker-controlled): values are only
 *   ever put into the page with textContent / createElement, never as HTML.
 * - The approver token lives in sessionStorage (this tab only) and travels in
 *   the Authorization header; there are no cookies, so no CSRF exposure.
 * - Live updates: GET /v1/approvals/events read with fetch() and a stream
 *   reader (EventSource cannot send the Authorization header); if the stream
 *   fails, the console polls every 3 s and retries the stream with backoff.
 * - Activity (GET /v1/activity, the audit trail) and Agents (GET /v1/agents,
 *   /v1/suspensions: operators only; others get the API's 403 detail as a
 *   read-only note) poll every 3 s while shown. Views: /console/ (approvals),
 *   /console/#activity, /console/#agents, /console/approvals/{id}.
 * - Coordination: Claims (GET /v1/claims, operators; force-release and transfer
 *   after an inline confirmation), Handoffs (GET /v1/claims/inbox: take, give
 *   back) and Duplicates (GET /v1/activity?record=duplicate, and GET
 *   /v1/duplicates for operators) poll every 5 s while shown:
 *   /console/#claims, /console/#handoffs, /console/#duplicates. Agent ids,
 *   resource ids and details there are attacker-controlled too: text only.
 * - Workflows (/console/#workflows): definitions, outcome KPIs of a window
 *   (GET /v1/workflows/kpis) with charts drawn as inline SVG (createElementNS,
 *   CSS classes, never a style attribute), instances and their history, every
 *   10 s while shown. Agent ids and business object ids: text only.
 * - Workflow inbox (/console/#workflow-inbox[/{item}]): the workflow exceptions
 *   escalated to the person's groups (GET /v1/workflows/inbox) and their
 *   decisions (retry, take-over, complete, close after a confirmation), every
 *   5 s while shown and after each decision.
 * - Budgets (/console/#budgets, operators): every budget's ledgers in the current or previous window
 *   (GET /v1/budgets, /v1/budgets/{name}) with a used/limit bar per key and the selected key's burn-down
 *   chart (inline SVG: this replica's bookings, the fleet's spend now, the limit, the projection), every
 *   10 s while shown. Budget names and key values: text only.
 */
(function () {
  "use strict";

  var TOKEN_KEY = "proctor.approverToken";
  var POLL_MS = 3000;
  var COORD_POLL_MS = 5000; // claims, handoffs and duplicates
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
    viewTimer: null,
    view: null,
    act: { events: [], limit: 100, sig: null, maxSeq: null, fresh: new Set(), selected: null, loading: false, gen: 0, debounce: null, shownQuery: null },
    ag: { agents: [], suspensions: [], sig: null, operator: null, suspendTarget: null, busy: false, loading: false, gen: 0 },
    cl: { claims: [], sig: null, shape: null, connectors: new Set(), action: null, busy: false, loading: false, gen: 0 },
    ho: { items: [], sig: null, giveBack: null, busy: false, loading: false, gen: 0 },
    du: { events: [], sig: null, wsig: null, loading: false, gen: 0 },
    wf: { defs: [], kpis: null, kpiError: null, sig: null, selected: null, instances: [], instSig: null, instanceId: null,
      instance: null, detailSig: null, loading: false, gen: 0, instGen: 0, detGen: 0, items: null, itemsSig: null, itemsGen: 0 },
    wi: { items: [], sig: null, selected: null, last: null, selSig: null, instSig: null, want: null, workflows: new Set(),
      busy: false, loading: false, gen: 0, instGen: 0 },
    bg: { details: [], now: null, selected: {}, loading: false, gen: 0 },
  };
  var ACTIVITY_STEP = 100;
  var ACTIVITY_MAX = 1000;

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
    if (S.view !== name) stopViewPolling();
    S.view = name;
    show($("login-view"), name === "login");
    show($("inbox-view"), name === "inbox");
    show($("detail-view"), name === "detail");
    show($("activity-view"), name === "activity");
    show($("agents-view"), name === "agents");
    show($("claims-view"), name === "claims");
    show($("handoffs-view"), name === "handoffs");
    show($("duplicates-view"), name === "duplicates");
    show($("workflows-view"), name === "workflows");
    show($("workflow-inbox-view"), name === "workflow-inbox");
    show($("budgets-view"), name === "budgets");
    show($("session"), name !== "login");
    show($("nav"), name !== "login");
    var current = ["activity", "agents", "claims", "handoffs", "duplicates", "workflows", "workflow-inbox", "budgets"].indexOf(name) >= 0 ? name : "approvals";
    Array.prototype.forEach.call($("nav").querySelectorAll("a"), function (a) {
      if (a.getAttribute("data-view") === current) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    });
  }

  /* Activity and Agents refresh themselves every 3 s while shown; Claims, Handoffs and Duplicates every 5 s. */
  function startViewPolling(fn, ms) {
    stopViewPolling();
    S.viewTimer = setInterval(fn, ms || POLL_MS);
  }

  function stopViewPolling() {
    if (S.viewTimer) clearInterval(S.viewTimer);
    S.viewTimer = null;
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
    if (location.pathname + location.hash !== path) history.pushState(null, "", path);
    route();
  }

  function route() {
    if (!S.token) {
      setView("login");
      return;
    }
    var id = detailIdFromPath();
    if (id) openDetail(id);
    else if (location.hash === "#activity") openActivity();
    else if (location.hash === "#agents") openAgents();
    else if (location.hash === "#claims") openClaims();
    else if (location.hash === "#handoffs") openHandoffs();
    else if (location.hash === "#duplicates") openDuplicates();
    else if (location.hash === "#workflows") openWorkflows();
    else if (isWorkflowInboxHash()) openWorkflowInbox(wiItemFromHash());
    else if (location.hash === "#budgets") openBudgets();
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
    resetActivity();
    resetAgents();
    resetClaims();
    resetHandoffs();
    resetDuplicates();
    resetWorkflows();
    resetWorkflowInbox();
    setText($("whoami"), "");
    setLive("off");
    if (location.pathname + location.hash !== "/console/") history.replaceState(null, "", "/console/");
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
    ["detail-action", "req-method", "req-url", "req-body", "req-body-note", "req-bound-note", "req-bound-absent", "cannot-decide"].forEach(function (id) {
      setText($(id), "");
    });
    setText($("detail-state"), "");
    $("detail-state").className = "badge";
    ["summary", "derived", "derived-attributes", "derived-fields", "derived-params", "policies"].forEach(function (id) {
      clear($(id));
    });
    clear($("req-headers").tBodies[0]);
    clear($("req-bound-headers").tBodies[0]);
    show($("req-bound-absent"), false);
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

  /* The headers the approval is bound to (null: must be absent); text nodes only. */
  function renderBoundHeaders(bound) {
    var tb = $("req-bound-headers").tBodies[0];
    clear(tb);
    var names = isPlainObject(bound) ? Object.keys(bound).sort() : [];
    if (!names.length) {
      setText($("req-bound-note"), "This approval predates bound headers: it is matched on method, URL and body.");
      show($("req-bound-absent"), false);
      return;
    }
    setText($("req-bound-note"), "Approving releases only a request with exactly these header values.");
    var absent = [];
    names.forEach(function (k) {
      if (bound[k] === null || bound[k] === undefined) absent.push(k);
      else tb.appendChild(el("tr", { data: { header: k } }, [el("th", { text: k }), el("td", { text: bound[k] })]));
    });
    if (!tb.rows.length) tb.appendChild(el("tr", {}, [el("td", { cls: "muted", text: "(none present)" })]));
    setText($("req-bound-absent"), absent.length ? "Must be absent: " + absent.join(", ") : "");
    show($("req-bound-absent"), absent.length > 0);
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
    renderBoundHeaders(req.bound_headers);
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

  // ------------------------------------------------------------------ activity (the audit trail)
  var DECISION_CLASS = {
    allow: "d-allow", approved: "d-allow", forwarded: "d-allow", resumed: "d-allow",
    deny: "d-deny", denied: "d-deny", expired: "d-deny", suspended: "d-deny",
    hold: "d-hold", requested: "d-hold", voted: "d-hold", escalated: "d-hold",
  };
  var EVENT_FIELDS = [
    ["sequence", "Sequence"], ["time", "Time"], ["record", "Record"], ["agent", "Agent"], ["operation", "Operation"],
    ["action", "Action"], ["resource", "Resource"], ["connector", "Connector"], ["decision", "Decision"],
    ["monitor", "Monitor mode"], ["monitored", "Would have been (not enforced)"], ["status", "Status"], ["refusal", "Refusal"], ["detail", "Detail"], ["reasons", "Reasons"],
    ["policy_decision", "Policy decision"], ["policy_revision", "Policy revision"], ["approval_id", "Approval"],
    ["decision_id", "Decision record"], ["method", "Method"], ["host", "Host"], ["path", "Path"], ["mode", "Mode"],
    ["risk", "Risk"], ["latency_ms", "Latency (ms)"], ["by", "By"], ["reason", "Reason"], ["kind", "Kind"],
    ["target", "Target"], ["severity", "Severity"], ["message", "Message"],
  ];

  function decisionClass(d) {
    return Object.prototype.hasOwnProperty.call(DECISION_CLASS, d) ? DECISION_CLASS[d] : "d-event";
  }

  function valueText(v) {
    if (v === null || v === undefined || v === "") return "\u2014";
    if (Array.isArray(v)) return v.length ? v.map(valueText).join(", ") : "(none)";
    if (isPlainObject(v)) return JSON.stringify(v);
    return String(v);
  }

  function activityQuery() {
    var parts = ["limit=" + S.act.limit];
    var agent = $("f-agent").value.trim();
    var action = $("f-action").value.trim();
    var d = $("f-decision").value;
    if (agent) parts.push("agent=" + encodeURIComponent(agent));
    if (action) parts.push("action=" + encodeURIComponent(action));
    if (d.indexOf("record:") === 0) parts.push("record=" + encodeURIComponent(d.slice(7)));
    else if (d) parts.push("decision=" + encodeURIComponent(d));
    return parts.join("&");
  }

  function resetActivity() {
    S.act.events = [];
    S.act.sig = null;
    S.act.maxSeq = null;
    S.act.fresh = new Set();
    S.act.selected = null;
    S.act.shownQuery = null;
    clear($("activity-rows"));
    clear($("event-fields"));
    show($("event-detail"), false);
    show($("activity-empty"), false);
    show($("activity-more"), false);
    show($("activity-error"), false);
    show($("activity-note"), false);
    setText($("activity-count"), "");
  }

  function openActivity() {
    S.detailId = null;
    setView("activity");
    loadActivity(true);
    startViewPolling(loadActivity);
  }

  /* Polls skip while a load is under way; `force` (new filters) starts one anyway and the older answer is dropped. */
  function loadActivity(force) {
    if (S.act.loading && force !== true) return Promise.resolve();
    var gen = ++S.act.gen;
    S.act.loading = true;
    var q = activityQuery();
    return api("GET", "/v1/activity?" + q).then(
      function (data) {
        if (gen !== S.act.gen) return;
        S.act.loading = false;
        if (S.view !== "activity" || q !== activityQuery()) return;
        show($("activity-error"), false);
        var disabled = !!(data && data.audit === "disabled");
        // a fleet answer some replica did not contribute to (docs/governance.md, "Fleet views")
        var missing = data && data.incomplete === true && Array.isArray(data.missing) ? data.missing.filter(isPlainObject) : [];
        setText($("activity-note"), disabled ? "The audit trail is disabled (or has no file yet), so there is no activity to show. " +
          "Enable audit.file in the configuration to record every decision." :
          missing.length ? "Partial: events of " + missing.map(function (m) { return String(m.replica) + " (" + String(m.error) + ")"; }).join(", ") +
          " are missing (that replica did not answer)." : "");
        show($("activity-note"), disabled || missing.length > 0);
        var events = (data && Array.isArray(data.events) ? data.events : []).filter(function (e) {
          return isPlainObject(e) && typeof e.sequence === "number";
        });
        var more = !!(data && ((data.next_before_sequence !== null && data.next_before_sequence !== undefined) ||
          (typeof data.next_cursor === "string"))) &&
          events.length >= S.act.limit && S.act.limit < ACTIVITY_MAX;
        show($("activity-more"), more);
        var sig = JSON.stringify(events);
        if (sig === S.act.sig && S.act.shownQuery === q) return;
        // rows newer than what this same query showed before are marked as new
        var fresh = new Set();
        if (S.act.shownQuery === q && S.act.maxSeq !== null) {
          events.forEach(function (e) { if (e.sequence > S.act.maxSeq) fresh.add(e.sequence); });
        }
        S.act.fresh = fresh;
        S.act.maxSeq = events.reduce(function (m, e) { return Math.max(m, e.sequence); }, S.act.maxSeq === null || S.act.shownQuery !== q ? 0 : S.act.maxSeq);
        S.act.sig = sig;
        S.act.shownQuery = q;
        S.act.events = events;
        renderActivity();
      },
      function (e) {
        if (gen !== S.act.gen) return;
        S.act.loading = false;
        if (authFailed(e) || S.view !== "activity") return;
        setText($("activity-error"), "Could not load the activity: " + e.message);
        show($("activity-error"), true);
      }
    );
  }

  function renderActivity() {
    var tbody = $("activity-rows");
    clear(tbody);
    S.act.events.forEach(function (e) { tbody.appendChild(activityRow(e)); });
    show($("activity-empty"), S.act.events.length === 0);
    var n = S.act.events.length;
    setText($("activity-count"), n + (n === 1 ? " event" : " events") + " (newest first)");
    if (S.act.selected !== null) {
      var sel = S.act.events.filter(function (e) { return e.sequence === S.act.selected; })[0];
      if (sel) renderEvent(sel);
    }
  }

  /* Refused before it was classified (no resource): what it asked for. */
  function requestLine(e) {
    if (!e.method && !e.host) return "";
    return [e.method, (e.host || "") + (e.path || "")].filter(function (x) { return x; }).join(" ");
  }

  function activityRow(e) {
    var d = e.decision || e.event || "";
    var cls = "activity-row " + decisionClass(d);
    // monitor mode: a would-be deny or hold that was not enforced is shown as such
    var monitored = e.monitor && e.monitored;
    if (monitored) cls += " is-monitor";
    if (S.act.fresh.has(e.sequence)) cls += " is-new";
    if (S.act.selected === e.sequence) cls += " is-selected";
    var tr = el("tr", {
      cls: cls,
      data: { seq: e.sequence, decision: d, agent: e.agent || "", record: e.record || "", testid: "activity-row" },
      attrs: { tabindex: "0" },
    }, [
      el("td", { cls: "time" }, [e.time ? timeNode(e.time, "rel") : el("span", { text: "\u2014" })]),
      el("td", { cls: "agent", text: e.agent || "\u2014" }),
      el("td", { cls: "operation", text: e.operation || "\u2014" }),
      el("td", { cls: "resource", text: e.resource || requestLine(e) || "\u2014" }),
      el("td", { cls: "decision" }, [el("span", { cls: "badge " + decisionClass(d), text: d || "?" })].concat(
        monitored ? [el("span", { cls: "badge monitor", text: "monitor: not enforced", data: { testid: "monitor-badge" } })]
          : [])),
      el("td", { cls: "status", text: e.status === undefined ? "\u2014" : e.status }),
      el("td", { cls: "reasons", text: Array.isArray(e.reasons) && e.reasons.length ? e.reasons.join(", ") : (e.reason || "") }),
    ]);
    function select() {
      S.act.selected = e.sequence;
      Array.prototype.forEach.call($("activity-rows").querySelectorAll(".activity-row"), function (r) {
        r.classList.toggle("is-selected", r === tr);
      });
      renderEvent(e);
    }
    tr.addEventListener("click", select);
    tr.addEventListener("keydown", function (ev) { if (ev.key === "Enter") select(); });
    return tr;
  }

  function renderEvent(e) {
    setText($("event-seq"), "#" + e.sequence);
    var dl = $("event-fields");
    clear(dl);
    var done = {};
    EVENT_FIELDS.forEach(function (f) {
      done[f[0]] = true;
      if (!Object.prototype.hasOwnProperty.call(e, f[0])) return;
      var v = f[0] === "time" && e.time ? e.time + " (" + absTime(e.time) + ")" : valueText(e[f[0]]);
      dlRow(dl, f[1], v, f[0]);
    });
    Object.keys(e).sort().forEach(function (k) {
      if (!done[k]) dlRow(dl, k, valueText(e[k]), k);
    });
    show($("event-detail"), true);
  }

  function activityFiltersChanged() {
    S.act.limit = ACTIVITY_STEP;
    S.act.selected = null;
    show($("event-detail"), false);
    loadActivity(true);
  }

  function initActivity() {
    function debounced() {
      if (S.act.debounce) clearTimeout(S.act.debounce);
      S.act.debounce = setTimeout(activityFiltersChanged, 300);
    }
    $("f-agent").addEventListener("input", debounced);
    $("f-action").addEventListener("input", debounced);
    $("f-decision").addEventListener("change", activityFiltersChanged);
    $("activity-filters").addEventListener("submit", function (ev) {
      ev.preventDefault();
      if (S.act.debounce) clearTimeout(S.act.debounce);
      activityFiltersChanged();
    });
    $("f-clear").addEventListener("click", function () {
      $("f-agent").value = "";
      $("f-action").value = "";
      $("f-decision").value = "";
      activityFiltersChanged();
    });
    $("activity-more").addEventListener("click", function () {
      S.act.limit = Math.min(S.act.limit + ACTIVITY_STEP, ACTIVITY_MAX);
      loadActivity(true);
    });
    $("event-close").addEventListener("click", function () {
      S.act.selected = null;
      show($("event-detail"), false);
      Array.prototype.forEach.call($("activity-rows").querySelectorAll(".is-selected"), function (r) {
        r.classList.remove("is-selected");
      });
    });
  }

  // ------------------------------------------------------------------ agents and the kill switch
  function resetAgents() {
    S.ag.agents = [];
    S.ag.suspensions = [];
    S.ag.sig = null;
    S.ag.operator = null;
    S.ag.suspendTarget = null;
    clear($("agent-rows"));
    clear($("suspension-rows"));
    show($("agents-panel"), false);
    show($("agents-readonly"), false);
    show($("suspend-form"), false);
    ["agents-error", "agents-notice", "suspend-error", "ns-error"].forEach(function (id) { showMsg(id, ""); });
    setText($("agents-count"), "");
  }

  function showMsg(id, msg) {
    setText($(id), msg);
    show($(id), !!msg);
  }

  function openAgents() {
    S.detailId = null;
    setView("agents");
    loadAgents(true);
    startViewPolling(loadAgents);
  }

  function loadAgents(force) {
    if (S.ag.loading && force !== true) return Promise.resolve();
    var gen = ++S.ag.gen;
    S.ag.loading = true;
    return api("GET", "/v1/agents").then(
      function (data) {
        return api("GET", "/v1/suspensions").then(function (susp) {
          if (gen !== S.ag.gen) return;
          S.ag.loading = false;
          if (S.view !== "agents") return;
          S.ag.operator = true;
          showMsg("agents-error", "");
          show($("agents-readonly"), false);
          show($("agents-panel"), true);
          var agents = (data && Array.isArray(data.agents) ? data.agents : []).filter(function (a) {
            return isPlainObject(a) && typeof a.id === "string";
          });
          var suspensions = (susp && Array.isArray(susp.suspensions) ? susp.suspensions : []).filter(isPlainObject);
          var sig = JSON.stringify([agents, suspensions]);
          if (sig === S.ag.sig) return;
          S.ag.sig = sig;
          S.ag.agents = agents;
          S.ag.suspensions = suspensions;
          renderAgents();
        });
      }
    ).catch(function (e) {
      if (gen !== S.ag.gen) return;
      S.ag.loading = false;
      if (authFailed(e) || S.view !== "agents") return;
      if (e.status === 403) {
        // not an operator: the registry and the kill switch are for operators; say why (the API's detail)
        S.ag.operator = false;
        S.ag.sig = null;
        clear($("agent-rows"));
        clear($("suspension-rows"));
        show($("agents-panel"), false);
        show($("suspend-form"), false);
        showMsg("agents-error", "");
        setText($("agents-count"), "");
        showMsg("agents-readonly", "Read-only: the agent registry and the kill switch are for operators. " + e.message);
        return;
      }
      showMsg("agents-error", "Could not load the agents: " + e.message);
    });
  }

  function renderAgents() {
    var tbody = $("agent-rows");
    clear(tbody);
    var agents = S.ag.agents.slice().sort(function (a, b) {
      return String(b.last_seen || "").localeCompare(String(a.last_seen || "")) || a.id.localeCompare(b.id);
    });
    agents.forEach(function (a) { tbody.appendChild(agentRow(a)); });
    show($("agents-empty"), agents.length === 0);
    var suspended = agents.filter(function (a) { return a.status === "suspended"; }).length;
    setText($("agents-count"), agents.length + (agents.length === 1 ? " agent" : " agents") + (suspended ? ", " + suspended + " suspended" : ""));

    var stb = $("suspension-rows");
    clear(stb);
    S.ag.suspensions.forEach(function (s) { stb.appendChild(suspensionRow(s)); });
    show($("suspensions"), S.ag.suspensions.length > 0);
    show($("suspensions-empty"), S.ag.suspensions.length === 0);
  }

  function num(v) {
    return typeof v === "number" ? String(v) : "\u2014";
  }

  function agentRow(a) {
    var suspended = a.status === "suspended";
    var s = isPlainObject(a.suspension) ? a.suspension : {};
    var status = el("td", { cls: "status" }, [
      el("span", { cls: "badge " + (suspended ? "state-denied" : "state-approved"), text: a.status || "?" }),
    ]);
    if (suspended) {
      status.appendChild(el("div", { cls: "sub muted", data: { testid: "agent-suspension" },
        text: "by " + (s.by || "?") + (s.reason ? ": " + s.reason : "") }));
    }
    var owner = [a.owner, a.team].filter(function (x) { return x; }).join(" \u00b7 ");
    var action = suspended
      ? el("button", { cls: "btn btn-approve btn-small", text: "Resume", data: { testid: "agent-resume" }, attrs: { type: "button" } })
      : el("button", { cls: "btn btn-deny btn-small", text: "Suspend", data: { testid: "agent-suspend" }, attrs: { type: "button" } });
    action.addEventListener("click", function () {
      if (suspended) resumeAgent(a.id, action);
      else openSuspend(a.id);
    });
    return el("tr", { cls: "agent-row", data: { id: a.id, status: a.status || "", testid: "agent-row" } }, [
      el("td", { cls: "agent mono", text: a.id, attrs: a.description ? { title: a.description } : {} }),
      el("td", { cls: "owner", text: owner || "\u2014" }),
      status,
      el("td", { cls: "num requests", text: num(a.requests) }),
      el("td", { cls: "num allowed", text: num(a.allowed) }),
      el("td", { cls: "num denied", text: num(a.denied) }),
      el("td", { cls: "last-seen" }, [a.last_seen ? timeNode(a.last_seen, "rel") : el("span", { cls: "muted", text: "never" })]),
      el("td", { cls: "row-actions" }, [action]),
    ]);
  }

  function suspensionRow(s) {
    var btn = el("button", { cls: "btn btn-approve btn-small", text: "Resume", data: { testid: "suspension-resume" }, attrs: { type: "button" } });
    btn.addEventListener("click", function () { resumeSuspension(s.kind, s.target, btn); });
    return el("tr", { cls: "suspension-row", data: { kind: s.kind || "", target: s.target || "", testid: "suspension-row" } }, [
      el("td", { text: s.kind }),
      el("td", { cls: "mono", text: s.target }),
      el("td", {}, [s.since ? timeNode(s.since, "rel") : el("span", { text: "\u2014" })]),
      el("td", { text: s.by }),
      el("td", { text: s.reason }),
      el("td", { cls: "row-actions" }, [btn]),
    ]);
  }

  function openSuspend(id) {
    S.ag.suspendTarget = id;
    setText($("suspend-target"), id);
    $("suspend-reason").value = "";
    showMsg("suspend-error", "");
    showMsg("agents-notice", "");
    show($("suspend-form"), true);
    $("suspend-reason").focus();
  }

  function closeSuspend() {
    S.ag.suspendTarget = null;
    show($("suspend-form"), false);
    showMsg("suspend-error", "");
  }

  /* One kill-switch call: disables `buttons` meanwhile, reports errors in `errId`, reloads the lists. */
  function govCall(method, path, body, buttons, errId, done) {
    if (S.ag.busy) return;
    S.ag.busy = true;
    buttons.forEach(function (b) { b.disabled = true; });
    showMsg(errId, "");
    api(method, path, body).then(
      function (res) {
        S.ag.sig = null;
        done(res);
        return loadAgents(true);
      },
      function (e) {
        if (authFailed(e)) return;
        showMsg(errId, e.message);
        if (e.status === 404) {
          S.ag.sig = null;
          loadAgents(true);
        }
      }
    ).then(function () {
      S.ag.busy = false;
      buttons.forEach(function (b) { b.disabled = false; });
    });
  }

  function confirmSuspend() {
    var id = S.ag.suspendTarget;
    if (!id) return;
    var reason = $("suspend-reason").value.trim();
    if (!reason) {
      showMsg("suspend-error", "A reason is required to suspend an agent (it is recorded and shown to the agent).");
      $("suspend-reason").focus();
      return;
    }
    govCall("POST", "/v1/agents/" + encodeURIComponent(id) + "/suspend", { reason: reason },
      [$("suspend-confirm"), $("suspend-cancel")], "suspend-error", function () {
        closeSuspend();
        showMsg("agents-notice", "Suspended " + id + ". Its requests are refused until it is resumed.");
      });
  }

  function resumeAgent(id, btn) {
    showMsg("agents-notice", "");
    govCall("POST", "/v1/agents/" + encodeURIComponent(id) + "/resume", {}, [btn], "agents-error", function () {
      showMsg("agents-notice", "Resumed " + id + ".");
    });
  }

  function resumeSuspension(kind, target, btn) {
    showMsg("agents-notice", "");
    govCall("DELETE", "/v1/suspensions/" + encodeURIComponent(kind) + "/" + encodeURIComponent(target), undefined, [btn],
      "ns-error", function () {
        showMsg("agents-notice", "Resumed " + kind + " " + target + ".");
      });
  }

  function createSuspension(ev) {
    ev.preventDefault();
    var kind = $("ns-kind").value;
    var target = $("ns-target").value.trim();
    var reason = $("ns-reason").value.trim();
    if (!target || !reason) {
      showMsg("ns-error", "A target and a reason are both required.");
      return;
    }
    showMsg("agents-notice", "");
    govCall("POST", "/v1/suspensions", { kind: kind, target: target, reason: reason }, [$("ns-submit")], "ns-error", function () {
      $("ns-target").value = "";
      $("ns-reason").value = "";
      showMsg("agents-notice", "Suspended " + kind + " " + target + ".");
    });
  }

  function initAgents() {
    $("suspend-confirm").addEventListener("click", confirmSuspend);
    $("suspend-cancel").addEventListener("click", closeSuspend);
    $("suspend-reason").addEventListener("input", function () { if ($("suspend-reason").value.trim()) showMsg("suspend-error", ""); });
    $("new-suspension").addEventListener("submit", createSuspension);
  }

  // ------------------------------------------------------------------ claims (operators)
  /* Holders that are not agents: a handoff queue (group:NAME) or a person (human:ID). */
  function holderLabel(holder) {
    var h = String(holder || "");
    if (h.indexOf("group:") === 0) return { kind: "queue", text: h.slice(6), badge: "handoff queue" };
    if (h.indexOf("human:") === 0) return { kind: "person", text: h.slice(6), badge: "person" };
    return { kind: "agent", text: h, badge: "" };
  }

  function untilNode(iso) {
    return el("span", {}, [timeNode(iso, "rel"), el("div", { cls: "sub muted", text: absTime(iso) })]);
  }

  function validClaim(c) {
    return isPlainObject(c) && typeof c.id === "string" && typeof c.resource === "string";
  }

  function resetClaims() {
    S.cl.claims = [];
    S.cl.sig = null;
    S.cl.shape = null;
    S.cl.action = null;
    clear($("claim-rows"));
    show($("claims-panel"), false);
    show($("claim-action"), false);
    show($("claims-readonly"), false);
    ["claims-error", "claims-notice", "claim-action-error"].forEach(function (id) { showMsg(id, ""); });
    setText($("claims-count"), "");
  }

  function openClaims() {
    S.detailId = null;
    setView("claims");
    loadClaims(true);
    startViewPolling(loadClaims, COORD_POLL_MS);
  }

  function claimsQuery() {
    var c = $("claims-connector").value;
    return c ? "?connector=" + encodeURIComponent(c) : "";
  }

  function loadClaims(force) {
    if (S.cl.loading && force !== true) return Promise.resolve();
    var gen = ++S.cl.gen;
    S.cl.loading = true;
    var q = claimsQuery();
    return api("GET", "/v1/claims" + q).then(
      function (data) {
        if (gen !== S.cl.gen) return;
        S.cl.loading = false;
        if (S.view !== "claims" || q !== claimsQuery()) return;
        showMsg("claims-error", "");
        show($("claims-readonly"), false);
        show($("claims-panel"), true);
        var claims = (data && Array.isArray(data.claims) ? data.claims : []).filter(validClaim);
        claims.forEach(function (c) { if (typeof c.connector === "string" && c.connector) S.cl.connectors.add(c.connector); });
        syncConnectorFilter();
        var sig = JSON.stringify([q, claims]);
        if (sig === S.cl.sig) return;
        // A renewal only moves a claim's expiry: update those cells in place, so the rows (and a
        // button under the pointer) stay put while agents keep writing.
        var shape = JSON.stringify([q, claims.map(function (c) { return Object.assign({}, c, { expires_at: null }); })]);
        S.cl.sig = sig;
        S.cl.claims = claims;
        if (shape === S.cl.shape && $("claim-rows").rows.length === claims.length) updateUntil(claims);
        else renderClaims();
        S.cl.shape = shape;
      },
      function (e) {
        if (gen !== S.cl.gen) return;
        S.cl.loading = false;
        if (authFailed(e) || S.view !== "claims") return;
        if (e.status === 403) {
          S.cl.sig = null;
          clear($("claim-rows"));
          show($("claims-panel"), false);
          show($("claim-action"), false);
          setText($("claims-count"), "");
          showMsg("claims-error", "");
          showMsg("claims-readonly", "Claims are shown to operators only. " + e.message);
          return;
        }
        showMsg("claims-error", "Could not load the claims: " + e.message);
      }
    );
  }

  function updateUntil(claims) {
    var byId = {};
    claims.forEach(function (c) { byId[c.id] = c; });
    Array.prototype.forEach.call($("claim-rows").rows, function (tr) {
      var c = byId[tr.getAttribute("data-id")];
      var cell = tr.querySelector(".until");
      if (!c || !cell) return;
      clear(cell);
      cell.appendChild(c.expires_at ? untilNode(c.expires_at) : el("span", { text: "\u2014" }));
    });
  }

  /* The connector filter lists every connector seen so far (a filtered answer names only one). */
  function syncConnectorFilter() {
    var sel = $("claims-connector");
    var have = {};
    Array.prototype.forEach.call(sel.options, function (o) { have[o.value] = true; });
    Array.from(S.cl.connectors).sort().forEach(function (name) {
      if (!have[name]) sel.appendChild(el("option", { text: name, attrs: { value: name } }));
    });
  }

  function renderClaims() {
    var tbody = $("claim-rows");
    clear(tbody);
    S.cl.claims.forEach(function (c) { tbody.appendChild(claimRow(c)); });
    show($("claims-empty"), S.cl.claims.length === 0);
    var n = S.cl.claims.length;
    setText($("claims-count"), n + (n === 1 ? " live claim" : " live claims"));
  }

  function holderCell(c) {
    var h = holderLabel(c.holder);
    var cell = el("td", { cls: "holder" }, [el("span", { cls: "mono", text: h.text || "\u2014" })]);
    if (h.badge) cell.appendChild(el("span", { cls: "badge holder-" + h.kind, text: h.badge }));
    var groups = Array.isArray(c.holder_groups) ? c.holder_groups.filter(function (g) { return typeof g === "string"; }) : [];
    cell.appendChild(el("div", { cls: "sub muted", data: { testid: "claim-groups" },
      text: groups.length ? "groups: " + groups.join(", ") : "no groups" }));
    return cell;
  }

  function claimRow(c) {
    var release = el("button", { cls: "btn btn-deny btn-small", text: "Release", data: { testid: "claim-release" }, attrs: { type: "button" } });
    var transfer = el("button", { cls: "btn btn-quiet btn-small", text: "Transfer\u2026", data: { testid: "claim-transfer" }, attrs: { type: "button" } });
    release.addEventListener("click", function () { openClaimAction("release", c); });
    transfer.addEventListener("click", function () { openClaimAction("transfer", c); });
    return el("tr", { cls: "claim-row", data: { id: c.id, holder: c.holder || "", resource: c.resource, testid: "claim-row" } }, [
      el("td", { cls: "connector", text: c.connector || "\u2014" }),
      el("td", { cls: "resource mono", text: c.resource }),
      holderCell(c),
      el("td", { cls: "mode", text: c.mode || "\u2014" }),
      el("td", { cls: "since" }, [c.since ? timeNode(c.since, "rel") : el("span", { text: "\u2014" })]),
      el("td", { cls: "until" }, [c.expires_at ? untilNode(c.expires_at) : el("span", { text: "\u2014" })]),
      el("td", { cls: "num fence", text: num(c.fence) }),
      el("td", { cls: "row-actions" }, [release, " ", transfer]),
    ]);
  }

  function openClaimAction(mode, c) {
    S.cl.action = { mode: mode, claim: c };
    var release = mode === "release";
    setText($("claim-action-title"), release ? "Force-release this claim?" : "Transfer this claim");
    var dl = $("claim-action-summary");
    clear(dl);
    dlRow(dl, "Resource", c.resource, "resource");
    dlRow(dl, "Connector", c.connector, "connector");
    dlRow(dl, "Holder", c.holder, "holder");
    dlRow(dl, "Claim", c.id, "id");
    dlRow(dl, "Fence", num(c.fence), "fence");
    setText($("claim-action-note"), release
      ? "The resource is free at once: the next agent that writes to it starts a new tenure (a higher fence). " +
        "The holder is not told; its next write claims the resource again if it is still free. Recorded with your id."
      : "The holder's tenure ends and the new holder's starts (a new claim id, the fence bumped, the same expiry). " +
        "The old holder's next write is refused (409). Recorded with your id.");
    setText($("claim-action-confirm"), release ? "Release" : "Transfer");
    $("claim-action-confirm").className = "btn " + (release ? "btn-deny" : "btn-primary");
    show($("transfer-fields"), !release);
    $("transfer-to").value = "";
    $("transfer-groups").value = "";
    $("transfer-reason").value = "";
    showMsg("claim-action-error", "");
    showMsg("claims-notice", "");
    show($("claim-action"), true);
    if (release) $("claim-action-confirm").focus();
    else $("transfer-to").focus();
  }

  function closeClaimAction() {
    S.cl.action = null;
    show($("claim-action"), false);
    showMsg("claim-action-error", "");
  }

  function confirmClaimAction() {
    var a = S.cl.action;
    if (!a || S.cl.busy) return;
    var c = a.claim;
    var path = "/v1/claims/" + encodeURIComponent(c.id) + "/" + (a.mode === "release" ? "release" : "transfer");
    var body;
    if (a.mode === "transfer") {
      var to = $("transfer-to").value.trim();
      if (!to) {
        showMsg("claim-action-error", "Name the agent that should hold the claim.");
        $("transfer-to").focus();
        return;
      }
      var groups = $("transfer-groups").value.split(",").map(function (g) { return g.trim(); }).filter(function (g) { return g; });
      var reason = $("transfer-reason").value.trim();
      body = { to: to, groups: groups };
      if (reason) body.reason = reason;
    }
    S.cl.busy = true;
    var buttons = [$("claim-action-confirm"), $("claim-action-cancel")];
    buttons.forEach(function (b) { b.disabled = true; });
    showMsg("claim-action-error", "");
    api("POST", path, body).then(
      function (res) {
        closeClaimAction();
        if (a.mode === "release") {
          showMsg("claims-notice", "Released the claim on " + c.resource + " (held by " + c.holder + "). The next write starts a new tenure.");
        } else {
          var now = res && isPlainObject(res.claim) ? res.claim : {};
          showMsg("claims-notice", "Transferred the claim on " + c.resource + " from " + c.holder + " to " +
            (now.holder || body.to) + " (fence " + num(now.fence) + ").");
        }
        S.cl.sig = null;
        return loadClaims(true);
      },
      function (e) {
        if (authFailed(e)) return;
        showMsg("claim-action-error", e.message);
        if (e.status === 404) {
          S.cl.sig = null;
          loadClaims(true);
        }
      }
    ).then(function () {
      S.cl.busy = false;
      buttons.forEach(function (b) { b.disabled = false; });
    });
  }

  function initClaims() {
    $("claims-connector").addEventListener("change", function () {
      S.cl.sig = null;
      loadClaims(true);
    });
    $("claim-action-confirm").addEventListener("click", confirmClaimAction);
    $("claim-action-cancel").addEventListener("click", closeClaimAction);
    ["transfer-to", "transfer-groups", "transfer-reason"].forEach(function (id) {
      $(id).addEventListener("keydown", function (ev) { if (ev.key === "Enter") confirmClaimAction(); });
    });
  }

  // ------------------------------------------------------------------ handoff inbox (people)
  function resetHandoffs() {
    S.ho.items = [];
    S.ho.sig = null;
    S.ho.giveBack = null;
    clear($("handoff-rows"));
    show($("giveback-confirm"), false);
    show($("handoffs-empty"), false);
    ["handoffs-error", "handoffs-notice", "giveback-error"].forEach(function (id) { showMsg(id, ""); });
    setText($("handoffs-count"), "");
  }

  function openHandoffs() {
    S.detailId = null;
    setView("handoffs");
    loadHandoffs(true);
    startViewPolling(loadHandoffs, COORD_POLL_MS);
  }

  function loadHandoffs(force) {
    if (S.ho.loading && force !== true) return Promise.resolve();
    var gen = ++S.ho.gen;
    S.ho.loading = true;
    return api("GET", "/v1/claims/inbox").then(
      function (data) {
        if (gen !== S.ho.gen) return;
        S.ho.loading = false;
        if (S.view !== "handoffs") return;
        showMsg("handoffs-error", "");
        var items = (data && Array.isArray(data.items) ? data.items : []).filter(function (i) {
          return isPlainObject(i) && validClaim(i.claim);
        });
        var sig = JSON.stringify(items);
        if (sig === S.ho.sig) return;
        S.ho.sig = sig;
        S.ho.items = items;
        renderHandoffs();
      },
      function (e) {
        if (gen !== S.ho.gen) return;
        S.ho.loading = false;
        if (authFailed(e) || S.view !== "handoffs") return;
        showMsg("handoffs-error", "Could not load the inbox: " + e.message);
      }
    );
  }

  function renderHandoffs() {
    var tbody = $("handoff-rows");
    clear(tbody);
    S.ho.items.forEach(function (i) { tbody.appendChild(handoffRow(i)); });
    var n = S.ho.items.length;
    show($("handoffs-empty"), n === 0);
    var waiting = S.ho.items.filter(function (i) { return i.taken_by === null || i.taken_by === undefined; }).length;
    setText($("handoffs-count"), n + (n === 1 ? " item" : " items") + (waiting ? ", " + waiting + " waiting" : ""));
  }

  function handoffRow(i) {
    var c = i.claim;
    var me = S.me && S.me.approver;
    var taken = typeof i.taken_by === "string" && i.taken_by !== "";
    var status = el("td", { cls: "status" }, [
      el("span", { cls: "badge " + (taken ? "state-approved" : "state-pending"), text: taken ? "taken" : "waiting" }),
    ]);
    if (taken) status.appendChild(el("div", { cls: "sub", data: { testid: "handoff-taken-by" },
      text: "by " + i.taken_by + (i.taken_by === me ? " (you)" : "") }));
    var action;
    if (!taken) {
      action = el("button", { cls: "btn btn-primary btn-small", text: "Take", data: { testid: "handoff-take" }, attrs: { type: "button" } });
      action.addEventListener("click", function () { takeItem(c, action); });
    } else {
      action = el("button", { cls: "btn btn-quiet btn-small", text: "Give back\u2026", data: { testid: "handoff-give-back" }, attrs: { type: "button" } });
      action.addEventListener("click", function () { openGiveBack(i); });
    }
    return el("tr", { cls: "handoff-row", data: { id: c.id, group: i.group || "", state: taken ? "taken" : "waiting",
      resource: c.resource, testid: "handoff-row" } }, [
      el("td", { cls: "group", text: i.group || "\u2014" }),
      el("td", { cls: "connector", text: c.connector || "\u2014" }),
      el("td", { cls: "resource mono", text: c.resource }),
      status,
      el("td", { cls: "since" }, [c.since ? timeNode(c.since, "rel") : el("span", { text: "\u2014" })]),
      el("td", { cls: "until" }, [c.expires_at ? untilNode(c.expires_at) : el("span", { text: "\u2014" })]),
      el("td", { cls: "row-actions" }, [action]),
    ]);
  }

  function takeItem(c, btn) {
    if (S.ho.busy) return;
    S.ho.busy = true;
    btn.disabled = true;
    showMsg("handoffs-notice", "");
    showMsg("handoffs-error", "");
    api("POST", "/v1/claims/" + encodeURIComponent(c.id) + "/take", {}).then(
      function () {
        showMsg("handoffs-notice", "You took " + c.resource + ". Agents' writes to it stay refused until you give it back.");
      },
      function (e) {
        if (authFailed(e)) return;
        showMsg("handoffs-error", "Could not take " + c.resource + ": " + e.message);
      }
    ).then(function () {
      S.ho.busy = false;
      btn.disabled = false;
      S.ho.sig = null;
      return loadHandoffs(true);
    });
  }

  function openGiveBack(i) {
    S.ho.giveBack = i.claim;
    setText($("giveback-resource"), i.claim.resource);
    showMsg("giveback-error", "");
    showMsg("handoffs-notice", "");
    show($("giveback-confirm"), true);
    $("giveback-yes").focus();
  }

  function closeGiveBack() {
    S.ho.giveBack = null;
    show($("giveback-confirm"), false);
    showMsg("giveback-error", "");
  }

  function confirmGiveBack() {
    var c = S.ho.giveBack;
    if (!c || S.ho.busy) return;
    S.ho.busy = true;
    var buttons = [$("giveback-yes"), $("giveback-cancel")];
    buttons.forEach(function (b) { b.disabled = true; });
    api("POST", "/v1/claims/" + encodeURIComponent(c.id) + "/give-back", {}).then(
      function () {
        closeGiveBack();
        showMsg("handoffs-notice", "Gave back " + c.resource + ": it is free for the next writer.");
      },
      function (e) {
        if (authFailed(e)) return;
        showMsg("giveback-error", e.message);
      }
    ).then(function () {
      S.ho.busy = false;
      buttons.forEach(function (b) { b.disabled = false; });
      S.ho.sig = null;
      return loadHandoffs(true);
    });
  }

  function initHandoffs() {
    $("giveback-yes").addEventListener("click", confirmGiveBack);
    $("giveback-cancel").addEventListener("click", closeGiveBack);
  }

  // ------------------------------------------------------------------ suppressed duplicates
  var DUPLICATE_LABELS = {
    duplicate: "duplicate (409)",
    "idempotency-in-progress": "still in progress (409)",
    "idempotency-not-replayable": "not replayable (409)",
    "idempotency-mismatch": "key reused (422)",
  };

  function duplicateOutcome(e) {
    if (e.decision === "replayed") {
      return { text: "replayed" + (e.kind === "dedupe" ? " (dedupe window)" : e.kind === "idempotency" ? " (Idempotency-Key)" : ""), cls: "d-allow" };
    }
    var k = typeof e.kind === "string" ? e.kind : "";
    var label = Object.prototype.hasOwnProperty.call(DUPLICATE_LABELS, k) ? DUPLICATE_LABELS[k] : (k || e.decision || "?");
    return { text: label, cls: e.decision === "mismatch" ? "d-deny" : "d-hold" };
  }

  function resetDuplicates() {
    S.du.events = [];
    S.du.sig = null;
    S.du.wsig = null;
    clear($("duplicate-rows"));
    clear($("window-rows"));
    show($("duplicates-empty"), false);
    show($("windows-panel"), false);
    show($("windows-readonly"), false);
    ["duplicates-error", "duplicates-note", "windows-error"].forEach(function (id) { showMsg(id, ""); });
    setText($("duplicates-count"), "");
  }

  function openDuplicates() {
    S.detailId = null;
    setView("duplicates");
    loadDuplicates(true);
    startViewPolling(loadDuplicates, COORD_POLL_MS);
  }

  function loadDuplicates(force) {
    if (S.du.loading && force !== true) return Promise.resolve();
    var gen = ++S.du.gen;
    S.du.loading = true;
    var recent = api("GET", "/v1/activity?record=duplicate&limit=100").then(
      function (data) {
        if (gen !== S.du.gen || S.view !== "duplicates") return;
        showMsg("duplicates-error", "");
        var disabled = !!(data && data.audit === "disabled");
        showMsg("duplicates-note", disabled ? "The audit trail is disabled (or has no file yet), so suppressed " +
          "requests are not listed. Enable audit.file in the configuration." : "");
        var events = (data && Array.isArray(data.events) ? data.events : []).filter(function (e) {
          return isPlainObject(e) && typeof e.sequence === "number";
        });
        var sig = JSON.stringify(events);
        if (sig === S.du.sig) return;
        S.du.sig = sig;
        S.du.events = events;
        renderDuplicates();
      },
      function (e) {
        if (gen !== S.du.gen || authFailed(e) || S.view !== "duplicates") return;
        showMsg("duplicates-error", "Could not load the suppressed requests: " + e.message);
      }
    );
    var live = api("GET", "/v1/duplicates?limit=200").then(
      function (data) {
        if (gen !== S.du.gen || S.view !== "duplicates") return;
        showMsg("windows-error", "");
        show($("windows-readonly"), false);
        show($("windows-panel"), true);
        var entries = (data && Array.isArray(data.entries) ? data.entries : []).filter(isPlainObject);
        var sig = JSON.stringify(entries);
        if (sig === S.du.wsig) return;
        S.du.wsig = sig;
        renderWindows(entries);
      },
      function (e) {
        if (gen !== S.du.gen || authFailed(e) || S.view !== "duplicates") return;
        if (e.status === 403) {
          S.du.wsig = null;
          clear($("window-rows"));
          show($("windows-panel"), false);
          showMsg("windows-error", "");
          showMsg("windows-readonly", "Live keys and windows are shown to operators only. " + e.message);
          return;
        }
        showMsg("windows-error", "Could not load the live keys and windows: " + e.message);
      }
    );
    return Promise.all([recent, live]).then(function () {
      if (gen === S.du.gen) S.du.loading = false;
    });
  }

  function renderDuplicates() {
    var tbody = $("duplicate-rows");
    clear(tbody);
    S.du.events.forEach(function (e) { tbody.appendChild(duplicateRow(e)); });
    var n = S.du.events.length;
    show($("duplicates-empty"), n === 0);
    setText($("duplicates-count"), n + (n === 1 ? " request" : " requests") + " (newest first)");
  }

  function duplicateRow(e) {
    var out = duplicateOutcome(e);
    return el("tr", { cls: "duplicate-row", data: { seq: e.sequence, outcome: e.decision || "", kind: e.kind || "",
      agent: e.agent || "", testid: "duplicate-row" }, attrs: e.message ? { title: String(e.message) } : {} }, [
      el("td", { cls: "time" }, [e.time ? timeNode(e.time, "rel") : el("span", { text: "\u2014" })]),
      el("td", { cls: "agent", text: e.agent || "\u2014" }),
      el("td", { cls: "action mono", text: e.action || "\u2014" }),
      el("td", { cls: "resource mono", text: e.resource || "\u2014" }),
      el("td", { cls: "outcome" }, [el("span", { cls: "badge " + out.cls, text: out.text, attrs: { title: e.kind || "" } })]),
      el("td", { cls: "first mono", data: { testid: "duplicate-first" }, text: e.first_decision_id || "\u2014" }),
      el("td", { cls: "decision-id mono", text: e.decision_id || "\u2014" }),
    ]);
  }

  function renderWindows(entries) {
    var tbody = $("window-rows");
    clear(tbody);
    entries.forEach(function (w) {
      var scope = w.kind === "dedupe" ? [w.connector, w.route].filter(function (x) { return x; }).join(" \u00b7 ") : w.scope;
      var state = w.state === "completed" ? "completed" + (w.status ? " (" + w.status + ")" : "") : "in progress";
      tbody.appendChild(el("tr", { cls: "window-row", data: { kind: w.kind || "", first: w.first_decision_id || "", testid: "window-row" } }, [
        el("td", { text: w.kind === "dedupe" ? "dedupe window" : "Idempotency-Key" }),
        el("td", { cls: "mono", text: scope || "\u2014" }),
        el("td", { text: w.agent || "\u2014" }),
        el("td", { text: state + (w.state === "completed" && w.kind !== "dedupe" ? (w.replayable ? ", replayed to retries" : ", retries get 409") : "") }),
        el("td", { cls: "mono", text: w.first_decision_id || "\u2014" }),
        el("td", {}, [w.created_at ? timeNode(w.created_at, "rel") : el("span", { text: "\u2014" })]),
        el("td", {}, [w.expires_at ? timeNode(w.expires_at, "rel") : el("span", { text: "\u2014" })]),
        el("td", { cls: "mono", text: w.first_result || "\u2014" }),
      ]));
    });
    show($("windows"), entries.length > 0);
    show($("windows-empty"), entries.length === 0);
  }

  // ------------------------------------------------------------------ workflows (outcomes, instances)
  /* GET /v1/workflows (definitions, instance counts), GET /v1/workflows/kpis (the outcome KPIs of a window),
   * GET /v1/workflows/instances and /v1/workflows/instances/{id} (history, objects). Charts are inline SVG
   * built here (createElementNS, classes only: the CSP allows no inline style). Agent ids, object ids and
   * every other value from the API are attacker-controlled: text nodes and attribute values only. */
  var SVG_NS = null; // the SVG namespace, read from the chart template's <svg> (initWorkflows)
  var WF_POLL_MS = 10000;
  var WF_WINDOWS = { 86400: 3600, 604800: 21600, 2592000: 86400 }; // window seconds -> bucket seconds
  var CHART = { w: 540, h: 250, left: 46, right: 16, top: 16, bottom: 52 };

  function svgEl(tag, attrs, children) {
    var node = document.createElementNS(SVG_NS, tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (attrs[k] !== null && attrs[k] !== undefined) node.setAttribute(k, String(attrs[k]));
    });
    (children || []).forEach(function (c) {
      if (c !== null && c !== undefined) node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }

  function svgText(attrs, text) {
    var t = svgEl("text", attrs);
    t.textContent = String(text);
    return t;
  }

  function svgTitle(text) {
    var t = svgEl("title");
    t.textContent = String(text);
    return t;
  }

  function isNum(v) {
    return typeof v === "number" && isFinite(v);
  }

  function round1(x) {
    var r = Math.round(x * 10) / 10;
    return String(r);
  }

  /* Seconds as 850 ms, 12 s, 4.5 min, 2.3 h, 1.2 d. */
  function fmtDuration(secs) {
    if (!isNum(secs)) return "\u2014";
    var a = Math.abs(secs);
    if (a < 1) return Math.round(secs * 1000) + " ms";
    if (a < 60) return round1(secs) + " s";
    if (a < 3600) return round1(secs / 60) + " min";
    if (a < 86400) return round1(secs / 3600) + " h";
    return round1(secs / 86400) + " d";
  }

  function fmtMs(ms) {
    return isNum(ms) ? fmtDuration(ms / 1000) : "\u2014";
  }

  function fmtRate(r) {
    return isNum(r) ? round1(r * 100) + "%" : "\u2014";
  }

  function fmtCount(n) {
    return isNum(n) ? String(n) : "\u2014";
  }

  function fmtCost(value, currency) {
    if (value === null || value === undefined || value === "") return "\u2014";
    return formatDecimal(value) + (currency ? " " + currency : "");
  }

  /* One KPI number: its raw value in data-value (what the API said), its rendering as text. */
  function kpiSpan(key, raw, text) {
    return el("span", { cls: "kpi-value", data: { kpi: key, value: raw === null || raw === undefined ? "" : raw }, text: text });
  }

  function resetWorkflows() {
    S.wf.defs = [];
    S.wf.kpis = null;
    S.wf.kpiError = null;
    S.wf.sig = null;
    S.wf.instances = [];
    S.wf.instSig = null;
    S.wf.instanceId = null;
    S.wf.instance = null;
    S.wf.detailSig = null;
    S.wf.items = null;
    S.wf.itemsSig = null;
    clear($("wf-instance-items"));
    show($("wf-instance-items"), false);
    setText($("wf-inbox-count"), "");
    clear($("workflow-rows"));
    clear($("wf-instance-rows"));
    show($("wf-detail"), false);
    show($("wf-instance"), false);
    show($("workflows-empty"), false);
    show($("wf-instances-empty"), false);
    ["workflows-error", "workflows-note", "wf-instances-error", "wf-instance-error"].forEach(function (id) { showMsg(id, ""); });
    setText($("wf-range"), "");
    setText($("wf-instances-count"), "");
  }

  function openWorkflows() {
    S.detailId = null;
    setView("workflows");
    loadWorkflows(true);
    startViewPolling(loadWorkflows, WF_POLL_MS);
  }

  function wfWindow() {
    var w = parseInt($("wf-window").value, 10);
    return Object.prototype.hasOwnProperty.call(WF_WINDOWS, w) ? w : 604800;
  }

  /* since = the window back from now, aligned down to a bucket edge (stable buckets between refreshes). */
  function kpiQuery() {
    var w = wfWindow();
    var bucket = WF_WINDOWS[w];
    var since = Math.floor((Math.floor(Date.now() / 1000) - w) / bucket) * bucket;
    return "since=" + since + "&bucket_seconds=" + bucket;
  }

  function instancesQuery() {
    var parts = ["limit=200"];
    var w = $("wf-filter-workflow").value;
    var st = $("wf-filter-state").value;
    if (w) parts.push("workflow=" + encodeURIComponent(w));
    if (st) parts.push("state=" + encodeURIComponent(st));
    return parts.join("&");
  }

  function loadWorkflows(force) {
    if (S.wf.loading && force !== true) return Promise.resolve();
    var gen = ++S.wf.gen;
    S.wf.loading = true;
    var kq = kpiQuery();
    var defs = api("GET", "/v1/workflows");
    var kpis = api("GET", "/v1/workflows/kpis?" + kq).then(
      function (data) { return { data: data, error: null }; },
      function (e) { if (e.status === 401) throw e; return { data: null, error: e }; }
    );
    var overview = Promise.all([defs, kpis]).then(
      function (res) {
        if (gen !== S.wf.gen || S.view !== "workflows") return;
        showMsg("workflows-error", "");
        var list = (res[0] && Array.isArray(res[0].workflows) ? res[0].workflows : []).filter(function (w) {
          return isPlainObject(w) && typeof w.name === "string";
        });
        var k = res[1].data;
        var kerr = res[1].error;
        showMsg("workflows-note", kerr ? "The outcome KPIs are unavailable (" + kerr.message + "); definitions and instances are shown." :
          k && k.truncated === true ? "Limits were reached while reading this window: the numbers cover what was read." : "");
        var sig = JSON.stringify([list, k, kerr ? kerr.message : null, $("wf-window").value]);
        if (sig === S.wf.sig) return;
        S.wf.sig = sig;
        S.wf.defs = list;
        S.wf.kpis = isPlainObject(k) ? k : null;
        S.wf.kpiError = kerr;
        if (!S.wf.selected || !list.some(function (w) { return w.name === S.wf.selected; })) {
          S.wf.selected = list.length ? list[0].name : null;
        }
        syncWorkflowFilter();
        renderWorkflows();
      },
      function (e) {
        if (gen !== S.wf.gen || authFailed(e) || S.view !== "workflows") return;
        showMsg("workflows-error", "Could not load the workflows: " + e.message);
      }
    );
    return Promise.all([overview, loadInstances(), loadInstance(), loadWfItems()]).then(function () {
      if (gen === S.wf.gen) S.wf.loading = false;
    });
  }

  /* The open workflow-inbox items of the person's groups: how many, by the link to the inbox, and the
   * selected instance's own items, linked from its detail. */
  function loadWfItems() {
    var gen = ++S.wf.itemsGen;
    return api("GET", "/v1/workflows/inbox?limit=1000").then(
      function (data) {
        if (gen !== S.wf.itemsGen || S.view !== "workflows") return;
        S.wf.items = (data && Array.isArray(data.items) ? data.items : []).filter(validWiItem);
        var n = S.wf.items.length;
        setText($("wf-inbox-count"), n ? " (" + n + " open)" : "");
        renderWfInstanceItems();
      },
      function (e) {
        if (gen !== S.wf.itemsGen || authFailed(e) || S.view !== "workflows") return;
        S.wf.items = null; // unknown: the instance detail then says nothing rather than "none"
        setText($("wf-inbox-count"), "");
        renderWfInstanceItems();
      }
    );
  }

  function followLink(a) {
    a.addEventListener("click", function (ev) {
      if (ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.altKey) return;
      ev.preventDefault();
      navigate(a.getAttribute("href"));
    });
    return a;
  }

  function renderWfInstanceItems() {
    var box = $("wf-instance-items");
    var id = S.wf.instanceId;
    var mine = id && Array.isArray(S.wf.items) ? S.wf.items.filter(function (i) { return i.instance === id; }) : [];
    var sig = JSON.stringify([id, mine]);
    if (sig === S.wf.itemsSig) return;
    S.wf.itemsSig = sig;
    clear(box);
    show(box, mine.length > 0);
    if (!mine.length) return;
    box.appendChild(document.createTextNode(mine.length === 1 ? "Waiting for a person: " : "Waiting for people: "));
    mine.forEach(function (i, n) {
      if (n) box.appendChild(document.createTextNode("; "));
      box.appendChild(followLink(el("a", { cls: "mono", text: i.id, attrs: { href: wiLink(i.id) },
        data: { testid: "wf-instance-item", id: i.id } })));
      box.appendChild(document.createTextNode(" (" + (i.step ? "step " + i.step + " " : "") + wiWhy(i) + "; group " +
        (i.group || "operators") + (wiTaken(i) ? "; taken over by " + i.taken_by : "") + ")"));
    });
    box.appendChild(document.createTextNode(". Decide it in the workflow inbox."));
  }

  function kpisOf(name) {
    var k = S.wf.kpis;
    if (!k || !Array.isArray(k.workflows)) return null;
    return k.workflows.filter(function (w) { return isPlainObject(w) && w.name === name; })[0] || null;
  }

  function syncWorkflowFilter() {
    var sel = $("wf-filter-workflow");
    var have = {};
    Array.prototype.forEach.call(sel.options, function (o) { have[o.value] = true; });
    S.wf.defs.forEach(function (w) {
      if (!have[w.name]) sel.appendChild(el("option", { text: w.name, attrs: { value: w.name } }));
    });
  }

  function renderWorkflows() {
    var k = S.wf.kpis;
    var range = $("wf-range");
    if (k && typeof k.since === "string" && typeof k.until === "string") {
      setText(range, absTime(k.since) + " \u2013 " + absTime(k.until));
      range.setAttribute("data-since", k.since);
      range.setAttribute("data-until", k.until);
      range.setAttribute("data-bucket", String(k.bucket_seconds));
    } else {
      setText(range, "");
      ["data-since", "data-until", "data-bucket"].forEach(function (a) { range.removeAttribute(a); });
    }
    var tbody = $("workflow-rows");
    clear(tbody);
    S.wf.defs.forEach(function (w) { tbody.appendChild(workflowRow(w, kpisOf(w.name))); });
    show($("workflows"), S.wf.defs.length > 0);
    show($("workflows-empty"), S.wf.defs.length === 0);
    renderWorkflowDetail();
  }

  function workflowRow(w, k) {
    var counts = isPlainObject(w.instances) ? w.instances : {};
    var ct = k && isPlainObject(k.cycle_time_seconds) ? k.cycle_time_seconds : {};
    var tp = k && isPlainObject(k.throughput) ? k.throughput : {};
    var sla = k && isPlainObject(k.sla) ? k.sla : {};
    var inst = k && isPlainObject(k.instances) ? k.instances : {};
    var name = el("td", { cls: "name" }, [el("span", { cls: "mono", text: w.name })]);
    if (w.description) name.appendChild(el("div", { cls: "sub muted", text: w.description }));
    var tr = el("tr", { cls: "workflow-row" + (S.wf.selected === w.name ? " is-selected" : ""),
      data: { name: w.name, testid: "workflow-row" }, attrs: { tabindex: "0" } }, [
      name,
      el("td", { cls: "num running", text: fmtCount(counts.running || 0) }),
      el("td", { cls: "num completed", text: fmtCount(counts.completed || 0) }),
      el("td", { cls: "num started", text: k ? fmtCount(inst.started) : "\u2014" }),
      el("td", { cls: "num cycle", text: k ? fmtDuration(ct.p50) : "\u2014" }),
      el("td", { cls: "num throughput", text: k ? fmtCount(tp.completed) + (isNum(tp.per_day) ? " (" + round1(tp.per_day) + "/day)" : "") : "\u2014" }),
      el("td", { cls: "num error-rate", text: k ? fmtRate(k.error_rate) : "\u2014" }),
      el("td", { cls: "num sla", text: k ? fmtRate(sla.adherence) : "\u2014" }),
      el("td", { cls: "num at-risk", text: k ? fmtCount(sla.at_risk) : "\u2014" }),
    ]);
    function select() {
      S.wf.selected = w.name;
      Array.prototype.forEach.call($("workflow-rows").rows, function (r) { r.classList.toggle("is-selected", r === tr); });
      renderWorkflowDetail();
    }
    tr.addEventListener("click", select);
    tr.addEventListener("keydown", function (ev) { if (ev.key === "Enter") select(); });
    return tr;
  }

  function renderWorkflowDetail() {
    var w = S.wf.defs.filter(function (d) { return d.name === S.wf.selected; })[0];
    show($("wf-detail"), !!w);
    if (!w) return;
    setText($("wf-name"), w.name);
    setText($("wf-description"), w.description || "");
    var k = kpisOf(w.name);
    var missing = $("wf-kpis-missing");
    setText(missing, k ? "" : S.wf.kpiError ? "No outcome KPIs: " + S.wf.kpiError.message : "No outcome KPIs for this workflow in this window.");
    show(missing, !k);
    show($("wf-kpi-panel"), !!k);
    if (!k) return;
    renderTiles(k, w);
    chartInto("wf-chart-cycle", cycleChart(k));
    chartInto("wf-chart-throughput", throughputChart(k));
    chartInto("wf-chart-sla", slaChart(k));
    renderStepTable(k);
    renderAgentTable(k);
  }

  var TILE_HELP = {
    wip: "Instances running now (work in progress); started and completed inside the window.",
    cycle: "Start to completion of the instances completed in the window.",
    split: "Per completed instance: the time spent waiting for people (approvals) and the rest (agents and systems).",
    throughput: "Instances completed in the window.",
    errors: "Failed step calls / (completed + failed) step calls in the window.",
    rework: "Steps of an instance completed more than once / steps completed.",
    sla: "Instances completed in the window within the workflow's sla_seconds.",
    "at-risk": "Running instances past 80% of the SLA target (the overdue ones included).",
    cost: "The mean cost of the instances completed in the window; the total of every call in it.",
    autonomy: "Completed steps with no person involved (no approval, no escalation) / completed steps.",
  };

  function tile(label, main, subs, kind) {
    var div = el("div", { cls: "tile", data: { tile: kind }, attrs: TILE_HELP[kind] ? { title: TILE_HELP[kind] } : {} },
      [el("dt", { text: label }), el("dd", { cls: "tile-main" }, main)]);
    if (subs && subs.length) div.appendChild(el("dd", { cls: "tile-sub muted" }, subs));
    return div;
  }

  function renderTiles(k, w) {
    var dl = $("wf-kpis");
    clear(dl);
    var inst = isPlainObject(k.instances) ? k.instances : {};
    var ct = isPlainObject(k.cycle_time_seconds) ? k.cycle_time_seconds : {};
    var tp = isPlainObject(k.throughput) ? k.throughput : {};
    var sla = isPlainObject(k.sla) ? k.sla : {};
    var cost = isPlainObject(k.cost) ? k.cost : {};
    var currency = typeof k.currency === "string" ? k.currency : (w.currency || "");
    var target = isNum(sla.target_seconds) ? sla.target_seconds : null;
    dl.appendChild(tile("Work in progress", [kpiSpan("running", inst.running, fmtCount(inst.running)), " running"],
      [kpiSpan("started", inst.started, fmtCount(inst.started)), " started, ",
       kpiSpan("completed", inst.completed, fmtCount(inst.completed)), " completed"].concat(isNum(inst.closed) ?
        [", ", kpiSpan("closed", inst.closed, fmtCount(inst.closed)), " closed by a person"] : []).concat([" in the window"]), "wip"));
    dl.appendChild(tile("Cycle time p50", [kpiSpan("cycle_p50", ct.p50, fmtDuration(ct.p50))],
      ["p90 ", kpiSpan("cycle_p90", ct.p90, fmtDuration(ct.p90)), " \u00b7 mean ",
       kpiSpan("cycle_mean", ct.mean, fmtDuration(ct.mean)), " \u00b7 ", kpiSpan("cycle_count", ct.count, fmtCount(ct.count)),
       " completed"], "cycle"));
    dl.appendChild(tile("Human wait / agent time (p50)",
      [kpiSpan("human_wait_p50", ct.human_wait_p50, fmtDuration(ct.human_wait_p50)), " / ",
       kpiSpan("agent_time_p50", ct.agent_time_p50, fmtDuration(ct.agent_time_p50))],
      [].concat(isNum(ct.human_wait_p90) || isNum(ct.agent_time_p90) ? [
        "p90 ", kpiSpan("human_wait_p90", ct.human_wait_p90, fmtDuration(ct.human_wait_p90)), " / ",
        kpiSpan("agent_time_p90", ct.agent_time_p90, fmtDuration(ct.agent_time_p90))] : []).concat(
        isNum(ct.human_wait_share) ? [" \u00b7 people ", kpiSpan("human_wait_share", ct.human_wait_share,
          fmtRate(ct.human_wait_share)), " of cycle time"] : []), "split"));
    dl.appendChild(tile("Throughput", [kpiSpan("throughput_completed", tp.completed, fmtCount(tp.completed)), " completed"],
      [kpiSpan("per_day", tp.per_day, isNum(tp.per_day) ? round1(tp.per_day) : "\u2014"), " per day"], "throughput"));
    dl.appendChild(tile("Error rate", [kpiSpan("error_rate", k.error_rate, fmtRate(k.error_rate))],
      ["failed step calls / finished step calls"], "errors"));
    dl.appendChild(tile("Rework rate", [kpiSpan("rework_rate", k.rework_rate, fmtRate(k.rework_rate))],
      ["steps completed more than once"], "rework"));
    dl.appendChild(tile("SLA adherence", [kpiSpan("sla_adherence", sla.adherence, fmtRate(sla.adherence))],
      [kpiSpan("sla_met", sla.met, fmtCount(sla.met)), " met \u00b7 ", kpiSpan("sla_missed", sla.missed, fmtCount(sla.missed)),
       " missed \u00b7 target " + (target === null ? "none" : fmtDuration(target))], "sla"));
    dl.appendChild(tile("At risk", [kpiSpan("sla_at_risk", sla.at_risk, fmtCount(sla.at_risk)), " running"],
      [target === null ? "no SLA target" : "past 80% of the " + fmtDuration(target) + " target"].concat(
        isNum(sla.overdue) ? [" \u00b7 ", kpiSpan("sla_overdue", sla.overdue, fmtCount(sla.overdue)), " overdue"] : []), "at-risk"));
    dl.appendChild(tile("Cost per instance", [kpiSpan("cost_per_instance", cost.per_instance, fmtCost(cost.per_instance, currency))],
      ["total ", kpiSpan("cost_total", cost.total, fmtCost(cost.total, currency))], "cost"));
    dl.appendChild(tile("Autonomy", [kpiSpan("autonomy_rate", k.autonomy_rate, fmtRate(k.autonomy_rate))],
      ["completed steps with no person involved"], "autonomy"));
  }

  // ---- charts
  /* Show a chart drawn into the figure's <svg> (its empty state: no <svg>) and what goes below it. */
  function chartInto(id, content) {
    var fig = $(id);
    var body = fig.querySelector(".chart-body");
    clear(body);
    var svg = fig.querySelector("svg.chart-svg");
    if (content.empty && svg) fig.removeChild(svg);
    fig.setAttribute("data-state", content.empty ? "empty" : "chart");
    content.nodes.forEach(function (n) { body.appendChild(n); });
  }

  function emptyChart(message, extra) {
    return { empty: true, nodes: [el("p", { cls: "chart-empty muted", data: { testid: "chart-empty" }, text: message })].concat(extra || []) };
  }

  function niceStep(raw) {
    var p = Math.pow(10, Math.floor(Math.log10(raw)));
    var m = raw / p;
    return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
  }

  /* The y scale of counts: integer ticks from 0 to a round top. */
  function countScale(max) {
    var step = Math.max(1, niceStep(Math.max(max, 1) / 4));
    var top = Math.max(step, Math.ceil(max / step) * step);
    var ticks = [];
    for (var v = 0; v <= top + 1e-9; v += step) ticks.push(v);
    return { top: top, ticks: ticks };
  }

  /* The frame, drawn into the <svg id="{id}-svg"> of figure `figId` (cloned from the template the first time):
   * <title>/<desc> (its aria-labelledby), gridlines, axes, y ticks, axis titles. Returns helpers to plot. */
  function chartFrame(figId, id, title, desc, max, yTitle, xTitle) {
    var c = CHART;
    var pw = c.w - c.left - c.right;
    var ph = c.h - c.top - c.bottom;
    var sc = countScale(max);
    var fig = $(figId);
    var svg = fig.querySelector("svg.chart-svg");
    if (!svg) {
      svg = $("wf-chart-svg").content.firstElementChild.cloneNode(false);
      fig.insertBefore(svg, fig.querySelector(".chart-body"));
    }
    clear(svg);
    svg.setAttribute("id", id + "-svg");
    svg.setAttribute("data-testid", id + "-svg");
    svg.setAttribute("aria-labelledby", id + "-title " + id + "-desc");
    svg.setAttribute("viewBox", "0 0 " + c.w + " " + c.h);
    var t = svgTitle(title);
    t.setAttribute("id", id + "-title");
    var d = svgEl("desc", { id: id + "-desc" });
    d.textContent = desc;
    svg.appendChild(t);
    svg.appendChild(d);
    var y = function (v) { return c.top + ph - (v / sc.top) * ph; };
    var grid = svgEl("g", { "class": "y-axis", "aria-hidden": "true" });
    sc.ticks.forEach(function (v) {
      grid.appendChild(svgEl("line", { "class": "grid-line", x1: c.left, x2: c.left + pw, y1: y(v), y2: y(v) }));
      grid.appendChild(svgText({ "class": "tick", x: c.left - 6, y: y(v) + 4, "text-anchor": "end" }, v));
    });
    svg.appendChild(grid);
    var axes = svgEl("g", { "class": "axes", "aria-hidden": "true" }, [
      svgEl("line", { "class": "axis", x1: c.left, x2: c.left, y1: c.top, y2: c.top + ph }),
      svgEl("line", { "class": "axis", x1: c.left, x2: c.left + pw, y1: c.top + ph, y2: c.top + ph }),
      svgText({ "class": "axis-title", x: 0, y: 0, "text-anchor": "middle",
        transform: "translate(12 " + (c.top + ph / 2) + ") rotate(-90)" }, yTitle),
      svgText({ "class": "axis-title", x: c.left + pw / 2, y: c.h - 6, "text-anchor": "middle" }, xTitle),
    ]);
    svg.appendChild(axes);
    return { svg: svg, y: y, pw: pw, ph: ph, base: c.top + ph, left: c.left };
  }

  function xLabel(f, x, text) {
    return svgText({ "class": "tick x-tick", x: x, y: f.base + 16, "text-anchor": "middle" }, text);
  }

  function legend(items) {
    return el("ul", { cls: "legend", attrs: { "aria-hidden": "true" } }, items.map(function (i) {
      return el("li", {}, [el("span", { cls: "swatch " + i[0] }), i[1]]);
    }));
  }

  /* A bucket's start for an x label: the day for day buckets, else the hour (with the day at midnight). */
  function bucketLabel(iso, bucketSeconds) {
    var t = Date.parse(iso);
    if (isNaN(t)) return "?";
    var d = new Date(t);
    var day = d.toLocaleDateString(undefined, { month: "short", day: "numeric" });
    if (bucketSeconds >= 86400) return day;
    var hm = d.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", hour12: false });
    return bucketSeconds >= 21600 || (d.getHours() === 0 && d.getMinutes() === 0) ? day + " " + hm : hm;
  }

  /* Label every n-th bucket so that labels of `chars` characters do not overlap. */
  function labelEvery(n, chars) {
    var fits = Math.max(1, Math.floor((CHART.w - CHART.left - CHART.right) / (Math.max(chars, 3) * 6.5 + 10)));
    return Math.max(1, Math.ceil(n / fits));
  }

  function longest(labels) {
    return labels.reduce(function (m, l) { return Math.max(m, String(l).length); }, 0);
  }

  /* A histogram bound, short: 1 min, 4 h, 30 d. */
  function fmtBound(secs) {
    if (!isNum(secs)) return "?";
    if (secs < 60) return secs + " s";
    if (secs < 3600) return round1(secs / 60) + " min";
    if (secs < 86400) return round1(secs / 3600) + " h";
    return round1(secs / 86400) + " d";
  }

  function cycleChart(k) {
    var ct = isPlainObject(k.cycle_time_seconds) ? k.cycle_time_seconds : {};
    var hist = (Array.isArray(k.cycle_time_histogram) ? k.cycle_time_histogram : []).filter(function (b) {
      return isPlainObject(b) && isNum(b.count);
    });
    if (!isNum(ct.count) || ct.count === 0 || !hist.length) return emptyChart("No completed instances in this window.");
    var labels = hist.map(function (b, i) {
      if (b.le === null || b.le === undefined) return "> " + (i > 0 ? fmtBound(hist[i - 1].le) : "?");
      return fmtBound(b.le);
    });
    var every = labelEvery(hist.length, longest(labels));
    var max = Math.max.apply(null, hist.map(function (b) { return b.count; }));
    var f = chartFrame("wf-chart-cycle", "wf-cycle", "Cycle time distribution of " + k.name,
      ct.count + " completed instances; p50 " + fmtDuration(ct.p50) + ", p90 " + fmtDuration(ct.p90) + ". " +
      hist.map(function (b, i) { return labels[i] + ": " + b.count; }).join(", ") + ".",
      max, "instances", "cycle time (up to)");
    var slot = f.pw / hist.length;
    var bars = svgEl("g", { "class": "bars" });
    hist.forEach(function (b, i) {
      var x = f.left + i * slot;
      var top = f.y(b.count);
      var bar = svgEl("rect", { "class": "bar bar-cycle", x: x + slot * 0.15, y: top, width: slot * 0.7, height: f.base - top,
        "data-count": b.count, "data-le": b.le === null || b.le === undefined ? "" : b.le }, [
        svgTitle((labels[i].charAt(0) === ">" ? "longer than " + labels[i].slice(2) : "up to " + labels[i]) + ": " + b.count +
          (b.count === 1 ? " instance" : " instances")),
      ]);
      bars.appendChild(bar);
      if (b.count > 0) bars.appendChild(svgText({ "class": "bar-label", x: x + slot / 2, y: top - 4, "text-anchor": "middle" }, b.count));
      if (i % every === 0) f.svg.appendChild(xLabel(f, x + slot / 2, labels[i]));
    });
    f.svg.appendChild(bars);
    return { empty: false, nodes: [] };
  }

  function throughputChart(k) {
    var tp = isPlainObject(k.throughput) ? k.throughput : {};
    var series = (Array.isArray(tp.series) ? tp.series : []).filter(isPlainObject);
    var total = series.reduce(function (n, b) { return n + (isNum(b.started) ? b.started : 0) + (isNum(b.completed) ? b.completed : 0); }, 0);
    if (!series.length || total === 0) return emptyChart("No instances started or completed in this window.");
    var bucket = isNum(k.bucket_seconds) ? k.bucket_seconds : (S.wf.kpis && S.wf.kpis.bucket_seconds) || 3600;
    var max = Math.max.apply(null, series.map(function (b) { return Math.max(b.started || 0, b.completed || 0); }));
    var f = chartFrame("wf-chart-throughput", "wf-throughput", "Throughput of " + k.name + " over time",
      "Instances started and completed per " + fmtDuration(bucket) + " bucket: " + series.reduce(function (n, b) { return n + (b.started || 0); }, 0) +
      " started, " + series.reduce(function (n, b) { return n + (b.completed || 0); }, 0) + " completed.",
      max, "instances", "bucket start (" + fmtDuration(bucket) + " each)");
    var n = series.length;
    var step = n > 1 ? f.pw / (n - 1) : 0;
    var xs = series.map(function (_, i) { return n > 1 ? f.left + i * step : f.left + f.pw / 2; });
    var tl = series.map(function (b) { return bucketLabel(b.start, bucket); });
    var every = labelEvery(n, longest(tl));
    series.forEach(function (b, i) {
      if (i % every === 0) f.svg.appendChild(xLabel(f, xs[i], tl[i]));
    });
    [["started", "line-started", "point-started"], ["completed", "line-completed", "point-completed"]].forEach(function (s) {
      var key = s[0];
      var pts = series.map(function (b, i) { return xs[i] + "," + f.y(isNum(b[key]) ? b[key] : 0); }).join(" ");
      var g = svgEl("g", { "class": "series series-" + key, "data-series": key });
      g.appendChild(svgEl("polyline", { "class": "line " + s[1], points: pts }));
      series.forEach(function (b, i) {
        var v = isNum(b[key]) ? b[key] : 0;
        g.appendChild(svgEl("circle", { "class": "point " + s[2], cx: xs[i], cy: f.y(v), r: 3.5, "data-count": v,
          "data-start": b.start || "" }, [svgTitle(absTime(b.start) + ": " + v + " " + key)]));
      });
      f.svg.appendChild(g);
    });
    return { empty: false, nodes: [legend([["swatch-started", "started"], ["swatch-completed", "completed"]])] };
  }

  function slaChart(k) {
    var sla = isPlainObject(k.sla) ? k.sla : {};
    var target = isNum(sla.target_seconds) ? sla.target_seconds : null;
    var atRisk = el("p", { cls: "at-risk-line", data: { testid: "wf-at-risk" } }, [
      el("span", { cls: "badge " + (sla.at_risk > 0 ? "state-pending" : "state-other"), text: fmtCount(sla.at_risk) + " at risk" }),
      " running " + (sla.at_risk === 1 ? "instance" : "instances") + " past 80% of the target",
    ]);
    if (target === null) return emptyChart("No SLA target is set for this workflow (sla_seconds).");
    var burn = (Array.isArray(sla.burn) ? sla.burn : []).filter(isPlainObject);
    var total = burn.reduce(function (n, b) { return n + (b.met || 0) + (b.missed || 0); }, 0);
    if (!burn.length || total === 0) return emptyChart("No completed instances in this window.", [atRisk]);
    var bucket = isNum(k.bucket_seconds) ? k.bucket_seconds : (S.wf.kpis && S.wf.kpis.bucket_seconds) || 3600;
    var max = Math.max.apply(null, burn.map(function (b) { return (b.met || 0) + (b.missed || 0); }));
    var f = chartFrame("wf-chart-sla", "wf-sla", "SLA burn of " + k.name,
      "Completions per " + fmtDuration(bucket) + " bucket within the " + fmtDuration(target) + " target (met) and past it (missed): " +
      (sla.met || 0) + " met, " + (sla.missed || 0) + " missed; " + fmtCount(sla.at_risk) + " running instances at risk.",
      max, "completions", "bucket start (" + fmtDuration(bucket) + " each)");
    var slot = f.pw / burn.length;
    var bl = burn.map(function (b) { return bucketLabel(b.start, bucket); });
    var every = labelEvery(burn.length, longest(bl));
    var bars = svgEl("g", { "class": "bars" });
    burn.forEach(function (b, i) {
      var x = f.left + i * slot;
      var met = isNum(b.met) ? b.met : 0;
      var missed = isNum(b.missed) ? b.missed : 0;
      var yMet = f.y(met);
      var yAll = f.y(met + missed);
      var w = Math.max(1, slot * 0.7);
      var when = absTime(b.start);
      bars.appendChild(svgEl("rect", { "class": "bar bar-met", x: x + slot * 0.15, y: yMet, width: w, height: f.base - yMet,
        "data-count": met, "data-start": b.start || "" }, [svgTitle(when + ": " + met + " met")]));
      bars.appendChild(svgEl("rect", { "class": "bar bar-missed", x: x + slot * 0.15, y: yAll, width: w, height: yMet - yAll,
        "data-count": missed, "data-start": b.start || "" }, [svgTitle(when + ": " + missed + " missed")]));
      if (i % every === 0) f.svg.appendChild(xLabel(f, x + slot / 2, bl[i]));
    });
    f.svg.appendChild(bars);
    return { empty: false, nodes: [legend([["swatch-met", "met"], ["swatch-missed", "missed"]]), atRisk] };
  }

  // ---- tables
  function renderStepTable(k) {
    var tbody = $("wf-step-rows");
    clear(tbody);
    (Array.isArray(k.steps) ? k.steps : []).filter(isPlainObject).forEach(function (s) {
      var d = isPlainObject(s.duration_ms) ? s.duration_ms : {};
      tbody.appendChild(el("tr", { cls: "step-row", data: { step: s.name || "", testid: "wf-step-row" } }, [
        el("td", { cls: "mono step", text: s.name || "\u2014" }),
        el("td", { cls: "num attempts", text: fmtCount(s.attempts) }),
        el("td", { cls: "num completions", text: fmtCount(s.completions) }),
        el("td", { cls: "num failures", text: fmtCount(s.failures) }),
        el("td", { cls: "num refusals", text: fmtCount(s.refusals) }),
        el("td", { cls: "num error-rate", text: fmtRate(s.error_rate) }),
        el("td", { cls: "num rework-rate", text: fmtRate(s.rework_rate) }),
        el("td", { cls: "num p50", text: fmtMs(d.p50) }),
        el("td", { cls: "num p90", text: fmtMs(d.p90) }),
        el("td", { cls: "num sla-target", text: isNum(s.sla_seconds) ? fmtDuration(s.sla_seconds) : "none" }),
        el("td", { cls: "num sla-adherence", text: fmtRate(s.sla_adherence) }),
        el("td", { cls: "num autonomy", text: fmtRate(s.autonomy_rate) }),
      ]));
    });
  }

  function renderAgentTable(k) {
    var tbody = $("wf-agent-rows");
    clear(tbody);
    var agents = (Array.isArray(k.agents) ? k.agents : []).filter(isPlainObject);
    agents.forEach(function (a) {
      tbody.appendChild(el("tr", { cls: "wf-agent-row", data: { agent: a.agent || "", testid: "wf-agent-row" } }, [
        el("td", { cls: "mono agent", text: a.agent || "\u2014" }),
        el("td", { cls: "num completions", text: fmtCount(a.completions) }),
        el("td", { cls: "num failures", text: fmtCount(a.failures) }),
        el("td", { cls: "num refusals", text: fmtCount(a.refusals) }),
        el("td", { cls: "num error-rate", text: fmtRate(a.error_rate) }),
      ]));
    });
    show($("wf-agents"), agents.length > 0);
    show($("wf-agents-empty"), agents.length === 0);
  }

  // ---- instances
  function loadInstances() {
    var gen = ++S.wf.instGen;
    var q = instancesQuery();
    return api("GET", "/v1/workflows/instances?" + q).then(
      function (data) {
        if (gen !== S.wf.instGen || S.view !== "workflows" || q !== instancesQuery()) return;
        showMsg("wf-instances-error", "");
        var list = (data && Array.isArray(data.instances) ? data.instances : []).filter(function (i) {
          return isPlainObject(i) && typeof i.id === "string";
        });
        var sig = JSON.stringify([q, list]);
        if (sig === S.wf.instSig) return;
        S.wf.instSig = sig;
        S.wf.instances = list;
        renderInstances();
      },
      function (e) {
        if (gen !== S.wf.instGen || authFailed(e) || S.view !== "workflows") return;
        showMsg("wf-instances-error", "Could not load the instances: " + e.message);
      }
    );
  }

  function instanceBadge(state) {
    return el("span", { cls: "badge " + (state === "completed" ? "state-approved" : state === "running" ? "state-pending" : "state-other"),
      text: state || "?" });
  }

  function renderInstances() {
    var tbody = $("wf-instance-rows");
    clear(tbody);
    S.wf.instances.forEach(function (i) { tbody.appendChild(instanceRow(i)); });
    var n = S.wf.instances.length;
    show($("wf-instances-empty"), n === 0);
    setText($("wf-instances-count"), n + (n === 1 ? " instance" : " instances") + " (most recently moved first)");
  }

  function instanceRow(i) {
    var tr = el("tr", { cls: "instance-row" + (S.wf.instanceId === i.id ? " is-selected" : ""),
      data: { id: i.id, state: i.state || "", workflow: i.workflow || "", testid: "wf-instance-row" }, attrs: { tabindex: "0" } }, [
      el("td", { cls: "mono id", text: i.id }),
      el("td", { cls: "workflow", text: i.workflow || "\u2014" }),
      el("td", { cls: "state" }, [instanceBadge(i.state)]),
      el("td", { cls: "started" }, [i.started_at ? timeNode(i.started_at, "rel") : el("span", { text: "\u2014" })]),
      el("td", { cls: "mono last-step", text: i.last_step || "\u2014" }),
      el("td", { cls: "mono next", text: Array.isArray(i.next) && i.next.length ? i.next.join(", ") : "\u2014" }),
      el("td", { cls: "num cost", text: fmtCost(i.cost, i.currency) }),
    ]);
    function select() {
      S.wf.instanceId = i.id;
      S.wf.detailSig = null;
      Array.prototype.forEach.call($("wf-instance-rows").rows, function (r) { r.classList.toggle("is-selected", r === tr); });
      renderWfInstanceItems();
      loadInstance().then(function () {
        if (S.wf.instanceId === i.id && !$("wf-instance").hidden) $("wf-instance").scrollIntoView({ block: "nearest" });
      });
    }
    tr.addEventListener("click", select);
    tr.addEventListener("keydown", function (ev) { if (ev.key === "Enter") select(); });
    return tr;
  }

  function loadInstance() {
    var id = S.wf.instanceId;
    if (!id) return Promise.resolve();
    var gen = ++S.wf.detGen;
    return api("GET", "/v1/workflows/instances/" + encodeURIComponent(id)).then(
      function (inst) {
        if (gen !== S.wf.detGen || S.wf.instanceId !== id || S.view !== "workflows" || !isPlainObject(inst)) return;
        showMsg("wf-instance-error", "");
        var sig = JSON.stringify(inst);
        if (sig === S.wf.detailSig) return;
        S.wf.detailSig = sig;
        S.wf.instance = inst;
        renderInstance(inst);
      },
      function (e) {
        if (gen !== S.wf.detGen || S.wf.instanceId !== id || authFailed(e) || S.view !== "workflows") return;
        show($("wf-instance"), true);
        setText($("wf-instance-id"), id);
        showMsg("wf-instance-error", e.status === 404 ? "There is no instance " + id + "." : "Could not load the instance: " + e.message);
      }
    );
  }

  function renderInstance(inst) {
    setText($("wf-instance-id"), inst.id);
    var dl = $("wf-instance-summary");
    clear(dl);
    dlRow(dl, "Workflow", inst.workflow, "workflow");
    dlRow(dl, "State", instanceBadge(inst.state), "state");
    dlRow(dl, "Started", absTime(inst.started_at), "started_at");
    dlRow(dl, "Completed", inst.completed_at ? absTime(inst.completed_at) : "", "completed_at");
    var t0 = Date.parse(inst.started_at);
    var t1 = inst.completed_at ? Date.parse(inst.completed_at) : NaN;
    if (!isNaN(t0) && !isNaN(t1)) dlRow(dl, "Cycle time", fmtDuration((t1 - t0) / 1000), "cycle_time");
    else if (!isNaN(t0)) dlRow(dl, "Running for", fmtDuration((Date.now() - t0) / 1000), "running_for");
    dlRow(dl, "Steps done", Array.isArray(inst.completed) && inst.completed.length ? inst.completed.join(", ") : "(none)", "completed");
    dlRow(dl, "Next", Array.isArray(inst.next) && inst.next.length ? inst.next.join(", ") : "", "next");
    dlRow(dl, "Cost", fmtCost(inst.cost, inst.currency), "cost");

    var tbody = $("wf-history-rows");
    clear(tbody);
    var events = (Array.isArray(inst.events) ? inst.events : []).filter(isPlainObject);
    events.forEach(function (e) {
      var objects = (Array.isArray(e.objects) ? e.objects : []).filter(Array.isArray).map(function (o) {
        return String(o[0]) + " " + String(o[1]);
      });
      var step = el("td", { cls: "step" }, [el("span", { cls: "mono", text: e.step || "\u2014" })]);
      if (e.action) step.appendChild(el("div", { cls: "sub muted mono", text: e.action }));
      if (objects.length) step.appendChild(el("div", { cls: "sub muted event-objects", text: objects.join(", ") }));
      var outcome = e.outcome === "completed" ? "d-allow" : e.outcome === "failed" ? "d-deny" : e.outcome === "refused" ? "d-hold" : "d-event";
      var wait = el("td", { cls: "num wait", text: isNum(e.approval_wait_ms) ? fmtMs(e.approval_wait_ms) : "\u2014" });
      if (e.human) wait.appendChild(el("div", { cls: "sub muted", text: "a person took part" }));
      tbody.appendChild(el("tr", { cls: "history-row", data: { seq: e.seq, outcome: e.outcome || "", step: e.step || "",
        agent: e.agent || "", testid: "wf-history-row" } }, [
        el("td", { cls: "time", text: e.time ? absTime(e.time) : "\u2014" }),
        step,
        el("td", { cls: "outcome" }, [el("span", { cls: "badge " + outcome, text: e.outcome || "?" })]),
        el("td", { cls: "agent mono", text: e.agent || "\u2014" }),
        el("td", { cls: "num status", text: e.status === null || e.status === undefined ? "\u2014" : e.status }),
        el("td", { cls: "num duration", text: fmtMs(e.duration_ms) }),
        wait,
        el("td", { cls: "num cost", text: fmtCost(e.cost, inst.currency) }),
        el("td", { cls: "mono decision-id", text: e.decision_id || "\u2014" }),
      ]));
    });
    show($("wf-history"), events.length > 0);
    show($("wf-history-empty"), events.length === 0);

    var otb = $("wf-object-rows");
    clear(otb);
    var objs = (Array.isArray(inst.objects) ? inst.objects : []).filter(isPlainObject);
    objs.forEach(function (o) {
      otb.appendChild(el("tr", { cls: "object-row", data: { type: o.type || "", id: o.id || "", testid: "wf-object-row" } }, [
        el("td", { cls: "type", text: o.type || "\u2014" }),
        el("td", { cls: "mono object-id", text: o.id || "\u2014" }),
        el("td", { cls: "mono step", text: o.step || "\u2014" }),
        el("td", { cls: "linked" }, [o.linked_at ? timeNode(o.linked_at, "rel") : el("span", { text: "\u2014" })]),
      ]));
    });
    show($("wf-objects"), objs.length > 0);
    show($("wf-objects-empty"), objs.length === 0);
    show($("wf-instance"), true);
  }

  function closeInstance() {
    S.wf.instanceId = null;
    S.wf.instance = null;
    S.wf.detailSig = null;
    S.wf.detGen++;
    renderWfInstanceItems();
    show($("wf-instance"), false);
    Array.prototype.forEach.call($("wf-instance-rows").querySelectorAll(".is-selected"), function (r) { r.classList.remove("is-selected"); });
  }

  function initWorkflows() {
    SVG_NS = $("wf-chart-svg").content.firstElementChild.namespaceURI;
    $("wf-window").addEventListener("change", function () {
      S.wf.sig = null;
      loadWorkflows(true);
    });
    ["wf-filter-workflow", "wf-filter-state"].forEach(function (id) {
      $(id).addEventListener("change", function () {
        S.wf.instSig = null;
        loadInstances();
      });
    });
    $("wf-instance-close").addEventListener("click", closeInstance);
    followLink($("wf-inbox-link"));
  }

  // ------------------------------------------------------------------ workflow inbox (people decide exceptions)
  /* GET /v1/workflows/inbox: the open items of the person's groups (operators: all), each with the instance's
   * step history; POST /v1/workflows/instances/{id}/escalations/{item}: retry, take-over, complete, close
   * (close after an inline confirmation). The selected item's business objects come from
   * GET /v1/workflows/instances/{id}. Agent ids, object ids and notes are attacker-controlled: text only.
   * Every 5 s while shown, and after each decision. /console/#workflow-inbox/{item} selects one item. */
  var WI_ITEM_RE = /^wfe_[A-Za-z0-9_-]{1,64}$/;
  var WI_INSTANCE_RE = /^wfi_[A-Za-z0-9_-]{1,64}$/;
  var WI_OBJECT_TYPE_RE = /^[A-Za-z_][A-Za-z0-9_]*$/;
  var WI_LABELS = { retry: "retry", "take-over": "take over", complete: "complete", close: "close the instance" };

  function timesText(n) {
    return isNum(n) ? n + (n === 1 ? " time" : " times") : "several times";
  }

  /* Why an item waits: failed 2 times / gave up after failing 3 times / stalled (and where the step went). */
  function wiWhy(i) {
    var text;
    if (i.reason === "failures") text = "failed " + timesText(i.failures);
    else if (i.reason === "gave-up") text = "gave up after failing " + timesText(i.failures);
    else if (i.reason === "stalled") text = "stalled (no progress within its SLA)";
    else text = String(i.reason || "?");
    if (typeof i.rerouted_to === "string" && i.rerouted_to) text += "; rerouted to " + i.rerouted_to;
    return text;
  }

  function wiTaken(i) {
    return i.state === "taken" && typeof i.taken_by === "string" && i.taken_by !== "";
  }

  function wiLink(itemId) {
    return "/console/#workflow-inbox/" + encodeURIComponent(itemId);
  }

  function isWorkflowInboxHash() {
    return /^#workflow-inbox(\/|$)/.test(location.hash);
  }

  function wiItemFromHash() {
    var m = /^#workflow-inbox\/(.+)$/.exec(location.hash);
    if (!m) return null;
    var id;
    try {
      id = decodeURIComponent(m[1]);
    } catch (e) {
      return null;
    }
    return WI_ITEM_RE.test(id) ? id : null;
  }

  function validWiItem(i) {
    return isPlainObject(i) && typeof i.id === "string" && WI_ITEM_RE.test(i.id) && typeof i.instance === "string" &&
      WI_INSTANCE_RE.test(i.instance) && typeof i.workflow === "string";
  }

  function wiSelectedItem() {
    var id = S.wi.selected;
    return id ? S.wi.items.filter(function (i) { return i.id === id; })[0] || null : null;
  }

  function resetWorkflowInbox() {
    S.wi.items = [];
    S.wi.sig = null;
    S.wi.selected = null;
    S.wi.last = null;
    S.wi.selSig = null;
    S.wi.instSig = null;
    S.wi.want = null;
    S.wi.workflows = new Set();
    clear($("wi-rows"));
    show($("wi-empty"), false);
    closeWiItem();
    ["wi-error", "wi-notice"].forEach(function (id) { showMsg(id, ""); });
    setText($("wi-count"), "");
  }

  function openWorkflowInbox(want) {
    S.detailId = null;
    setView("workflow-inbox");
    if (want) {
      S.wi.want = want;
      if ($("wi-workflow").value) {
        $("wi-workflow").value = "";
        S.wi.sig = null;
      }
    }
    loadWorkflowInbox(true);
    startViewPolling(loadWorkflowInbox, COORD_POLL_MS);
  }

  function wiQuery() {
    var w = $("wi-workflow").value;
    return "limit=1000" + (w ? "&workflow=" + encodeURIComponent(w) : "");
  }

  function loadWorkflowInbox(force) {
    if (S.wi.loading && force !== true) return Promise.resolve();
    var gen = ++S.wi.gen;
    S.wi.loading = true;
    var q = wiQuery();
    return api("GET", "/v1/workflows/inbox?" + q).then(
      function (data) {
        if (gen !== S.wi.gen) return;
        S.wi.loading = false;
        if (S.view !== "workflow-inbox" || q !== wiQuery()) return;
        showMsg("wi-error", "");
        var items = (data && Array.isArray(data.items) ? data.items : []).filter(validWiItem);
        items.forEach(function (i) { S.wi.workflows.add(i.workflow); });
        syncWiWorkflowFilter();
        if (S.wi.want) {
          var want = S.wi.want;
          S.wi.want = null;
          if (items.some(function (i) { return i.id === want; })) selectWiItem(want);
          else showMsg("wi-notice", "Item " + want + " is not open in your groups: it was decided already, the step's " +
            "completion resolved it, or it belongs to another group.");
        }
        var sig = JSON.stringify([q, items]);
        if (sig !== S.wi.sig) {
          S.wi.sig = sig;
          S.wi.items = items;
          renderWorkflowInbox();
        }
        return loadWiInstance();
      },
      function (e) {
        if (gen !== S.wi.gen) return;
        S.wi.loading = false;
        if (authFailed(e) || S.view !== "workflow-inbox") return;
        showMsg("wi-error", "Could not load the workflow inbox: " + e.message);
      }
    );
  }

  function syncWiWorkflowFilter() {
    var sel = $("wi-workflow");
    var have = {};
    Array.prototype.forEach.call(sel.options, function (o) { have[o.value] = true; });
    Array.from(S.wi.workflows).sort().forEach(function (name) {
      if (!have[name]) sel.appendChild(el("option", { text: name, attrs: { value: name } }));
    });
  }

  function renderWorkflowInbox() {
    var tbody = $("wi-rows");
    clear(tbody);
    S.wi.items.forEach(function (i) { tbody.appendChild(wiRow(i)); });
    var n = S.wi.items.length;
    show($("wi-items"), n > 0);
    show($("wi-empty"), n === 0);
    var taken = S.wi.items.filter(wiTaken).length;
    setText($("wi-count"), n + (n === 1 ? " item" : " items") + (taken ? ", " + taken + " taken over" : ""));
    renderWiItem();
  }

  function wiRow(i) {
    var me = S.me && S.me.approver;
    var taken = wiTaken(i);
    var state = el("td", { cls: "state" }, [
      el("span", { cls: "badge " + (taken ? "state-approved" : "state-pending"), text: taken ? "taken" : "open" }),
    ]);
    if (taken) state.appendChild(el("div", { cls: "sub", data: { testid: "wi-taken-by" },
      text: "by " + i.taken_by + (i.taken_by === me ? " (you)" : "") }));
    var why = el("td", { cls: "why" }, [el("span", { cls: "badge " + (i.reason === "gave-up" ? "state-denied" :
      i.reason === "stalled" ? "state-other" : "state-pending"), text: i.reason || "?" }),
    el("div", { cls: "sub", text: wiWhy(i) })]);
    var tr = el("tr", { cls: "wi-row" + (S.wi.selected === i.id ? " is-selected" : ""), attrs: { tabindex: "0" },
      data: { id: i.id, instance: i.instance, workflow: i.workflow, step: i.step || "", group: i.group || "",
        reason: i.reason || "", state: taken ? "taken" : "open", agent: i.agent || "", testid: "wi-row" } }, [
      el("td", { cls: "workflow", text: i.workflow }),
      el("td", { cls: "instance mono", text: i.instance }),
      el("td", { cls: "step mono", text: i.step || "(the instance)" }),
      el("td", { cls: "group", text: i.group || "operators" }),
      why,
      el("td", { cls: "agent mono", text: i.agent || "\u2014" }),
      el("td", { cls: "opened" }, [i.opened_at ? timeNode(i.opened_at, "rel") : el("span", { text: "\u2014" })]),
      state,
    ]);
    function select() {
      selectWiItem(i.id);
      renderWiItem();
      loadWiInstance().then(function () {
        if (S.wi.selected === i.id && !$("wi-item").hidden) $("wi-item").scrollIntoView({ block: "nearest" });
      });
    }
    tr.addEventListener("click", select);
    tr.addEventListener("keydown", function (ev) { if (ev.key === "Enter") select(); });
    return tr;
  }

  /* Select an item: a fresh decision form (nothing typed for another item carries over). */
  function selectWiItem(id) {
    if (S.wi.selected !== id) {
      ["wi-note", "wi-to", "wi-objects-input"].forEach(function (f) { $(f).value = ""; });
      closeWiConfirm();
      showMsg("wi-decide-error", "");
      S.wi.selSig = null;
      S.wi.instSig = null;
      S.wi.last = null;
      clear($("wi-object-rows"));
      show($("wi-objects"), false);
      show($("wi-objects-empty"), false);
    }
    S.wi.selected = id;
    var link = wiLink(id);
    if (location.pathname + location.hash !== link) history.replaceState(null, "", link);
    Array.prototype.forEach.call($("wi-rows").rows, function (r) {
      r.classList.toggle("is-selected", r.getAttribute("data-id") === id);
    });
  }

  function closeWiItem() {
    S.wi.selected = null;
    S.wi.last = null;
    S.wi.selSig = null;
    S.wi.instSig = null;
    closeWiConfirm();
    showMsg("wi-decide-error", "");
    show($("wi-item"), false);
    Array.prototype.forEach.call($("wi-rows").querySelectorAll(".is-selected"), function (r) { r.classList.remove("is-selected"); });
    if (S.view === "workflow-inbox" && location.hash !== "#workflow-inbox") history.replaceState(null, "", "/console/#workflow-inbox");
  }

  function renderWiItem() {
    if (!S.wi.selected) {
      show($("wi-item"), false);
      return;
    }
    var i = wiSelectedItem();
    var gone = !i;
    if (gone) {
      i = S.wi.last;
      if (!i) {
        show($("wi-item"), false);
        return;
      }
    }
    S.wi.last = i;
    show($("wi-item-gone"), gone);
    if (gone) {
      setText($("wi-item-gone"), "This item is no longer open: someone decided it, or the step's completion resolved it.");
      closeWiConfirm();
    }
    show($("wi-decide"), !gone);
    var sig = JSON.stringify(i);
    if (sig === S.wi.selSig) {
      show($("wi-item"), true);
      return;
    }
    S.wi.selSig = sig;
    setText($("wi-item-id"), i.id);
    var me = S.me && S.me.approver;
    var dl = $("wi-summary");
    clear(dl);
    dlRow(dl, "Workflow", i.workflow, "workflow");
    dlRow(dl, "Instance", i.instance, "instance");
    dlRow(dl, "Step", i.step || "(the instance as a whole)", "step");
    dlRow(dl, "Group", i.group || "operators", "group");
    dlRow(dl, "Why", wiWhy(i), "why");
    dlRow(dl, "State", wiTaken(i) ? "taken over by " + i.taken_by + (i.taken_by === me ? " (you)" : "") : "open", "state");
    dlRow(dl, "Opened", absTime(i.opened_at), "opened_at");
    dlRow(dl, "Agent", i.agent || "", "agent");
    dlRow(dl, "Decision", i.decision_id || "", "decision_id");
    dlRow(dl, "Steps done", Array.isArray(i.completed) && i.completed.length ? i.completed.join(", ") : "(none)", "completed");
    dlRow(dl, "Next", Array.isArray(i.next) && i.next.length ? i.next.join(", ") : "", "next");
    dlRow(dl, "Instance started", absTime(i.started_at), "started_at");

    var allowed = Array.isArray(i.resolutions) ? i.resolutions : [];
    Array.prototype.forEach.call($("wi-decide").querySelectorAll("button[data-resolution]"), function (b) {
      var r = b.getAttribute("data-resolution");
      show(b, allowed.indexOf(r) >= 0);
      b.disabled = S.wi.busy || (r === "take-over" && wiTaken(i));
    });

    var tbody = $("wi-history-rows");
    clear(tbody);
    var events = (Array.isArray(i.history) ? i.history : []).filter(isPlainObject);
    events.forEach(function (e) {
      var outcome = e.outcome === "completed" ? "d-allow" : e.outcome === "failed" ? "d-deny" : e.outcome === "refused" ? "d-hold" : "d-event";
      var agent = el("td", { cls: "agent mono", text: e.agent || "\u2014" });
      if (e.human) agent.appendChild(el("div", { cls: "sub muted", text: "a person took part" }));
      tbody.appendChild(el("tr", { cls: "history-row", data: { step: e.step || "", outcome: e.outcome || "",
        agent: e.agent || "", testid: "wi-history-row" } }, [
        el("td", { cls: "time", text: e.time ? absTime(e.time) : "\u2014" }),
        el("td", { cls: "step mono", text: e.step || "\u2014" }),
        el("td", { cls: "outcome" }, [el("span", { cls: "badge " + outcome, text: e.outcome || "?" })]),
        agent,
        el("td", { cls: "num status", text: e.status === null || e.status === undefined ? "\u2014" : e.status }),
        el("td", { cls: "mono decision-id", text: e.decision_id || "\u2014" }),
      ]));
    });
    show($("wi-history"), events.length > 0);
    show($("wi-history-empty"), events.length === 0);
    show($("wi-item"), true);
  }

  /* The selected item's instance: its business objects (what the person decides about). */
  function loadWiInstance() {
    var i = wiSelectedItem();
    if (!i) return Promise.resolve();
    var id = i.instance;
    var gen = ++S.wi.instGen;
    return api("GET", "/v1/workflows/instances/" + encodeURIComponent(id)).then(
      function (inst) {
        var cur = wiSelectedItem();
        if (gen !== S.wi.instGen || !cur || cur.instance !== id || S.view !== "workflow-inbox" || !isPlainObject(inst)) return;
        var objs = (Array.isArray(inst.objects) ? inst.objects : []).filter(isPlainObject);
        var sig = JSON.stringify(objs);
        if (sig === S.wi.instSig) return;
        S.wi.instSig = sig;
        var tbody = $("wi-object-rows");
        clear(tbody);
        objs.forEach(function (o) {
          tbody.appendChild(el("tr", { cls: "object-row", data: { type: o.type || "", id: o.id || "", testid: "wi-object-row" } }, [
            el("td", { cls: "type", text: o.type || "\u2014" }),
            el("td", { cls: "mono object-id", text: o.id || "\u2014" }),
            el("td", { cls: "mono step", text: o.step || "\u2014" }),
          ]));
        });
        show($("wi-objects"), objs.length > 0);
        show($("wi-objects-empty"), objs.length === 0);
        setText($("wi-objects-empty"), "No business objects linked.");
      },
      function (e) {
        if (gen !== S.wi.instGen || authFailed(e) || S.view !== "workflow-inbox") return;
        S.wi.instSig = null;
        show($("wi-objects"), false);
        show($("wi-objects-empty"), true);
        setText($("wi-objects-empty"), "Could not load the instance's business objects: " + e.message);
      }
    );
  }

  /* The Complete field: one Type:id a line (blank lines ignored). */
  function wiObjects() {
    var out = [];
    var lines = $("wi-objects-input").value.split(/\r\n|\r|\n/);
    for (var n = 0; n < lines.length; n++) {
      var line = lines[n].trim();
      if (!line) continue;
      var at = line.indexOf(":");
      var type = at < 0 ? "" : line.slice(0, at).trim();
      var id = at < 0 ? "" : line.slice(at + 1).trim();
      if (!WI_OBJECT_TYPE_RE.test(type) || !id) {
        return { error: "Line " + (n + 1) + " of what you made: write Type:id (a type name such as PurchaseOrder, a colon, the id)." };
      }
      out.push({ type: type, id: id });
    }
    return { objects: out };
  }

  function wiDecide(resolution, confirmed) {
    var i = wiSelectedItem();
    if (!i || S.wi.busy) return;
    showMsg("wi-decide-error", "");
    showMsg("wi-notice", "");
    var body = { resolution: resolution };
    var note = $("wi-note").value.trim();
    if (note) body.note = note;
    var to = $("wi-to").value.trim();
    if (to) {
      if (resolution !== "retry") {
        showMsg("wi-decide-error", "\u201cGive the step to this agent\u201d goes with Retry: clear it, or choose Retry.");
        return;
      }
      body.to = to;
    }
    var parsed = wiObjects();
    if (parsed.error) {
      showMsg("wi-decide-error", parsed.error);
      return;
    }
    if (parsed.objects.length) {
      if (resolution !== "complete") {
        showMsg("wi-decide-error", "\u201cWhat you made\u201d goes with Complete: clear it, or choose Complete.");
        return;
      }
      body.objects = parsed.objects;
    }
    if (resolution === "close" && !confirmed) {
      setText($("wi-close-instance"), i.instance);
      show($("wi-close-confirm"), true);
      $("wi-close-yes").focus();
      return;
    }
    S.wi.busy = true;
    var buttons = Array.prototype.slice.call($("wi-decide").querySelectorAll("button"));
    buttons.forEach(function (b) { b.disabled = true; });
    var path = "/v1/workflows/instances/" + encodeURIComponent(i.instance) + "/escalations/" + encodeURIComponent(i.id);
    api("POST", path, body).then(
      function (res) {
        closeWiConfirm();
        showMsg("wi-notice", wiDecidedText(resolution, i, body, isPlainObject(res) ? res : {}));
        if (resolution === "take-over") {
          $("wi-note").value = "";
        } else {
          closeWiItem();
        }
      },
      function (e) {
        if (authFailed(e)) return;
        showMsg("wi-decide-error", "Could not " + WI_LABELS[resolution] + " (" + (e.status || "no answer") + "): " + e.message);
      }
    ).then(function () {
      S.wi.busy = false;
      buttons.forEach(function (b) { b.disabled = false; });
      S.wi.sig = null;
      S.wi.selSig = null;
      return loadWorkflowInbox(true);
    });
  }

  function wiDecidedText(resolution, i, body, res) {
    var step = i.step ? "step " + i.step + " of " + i.instance : i.instance;
    if (resolution === "retry") {
      return "Retry allowed: agents may call " + step + " again with a fresh retry budget" +
        (body.to ? " (only " + body.to + " from now on)." : ".");
    }
    if (resolution === "take-over") {
      return "You took " + step + " over: agents' calls of it are refused until you decide retry, complete or close.";
    }
    if (resolution === "complete") {
      var done = Array.isArray(res.completed) ? res.completed.join(", ") : "";
      return "Recorded " + step + " as completed by you" + (done ? "; done: " + done : "") +
        (res.state ? " (" + res.state + ")." : ".");
    }
    return "Closed " + i.instance + " as failed: every call of its steps is refused.";
  }

  function closeWiConfirm() {
    show($("wi-close-confirm"), false);
  }

  function initWorkflowInbox() {
    $("wi-workflow").addEventListener("change", function () {
      S.wi.sig = null;
      loadWorkflowInbox(true);
    });
    Array.prototype.forEach.call($("wi-decide").querySelectorAll("button[data-resolution]"), function (b) {
      b.addEventListener("click", function () { wiDecide(b.getAttribute("data-resolution"), false); });
    });
    $("wi-close-yes").addEventListener("click", function () { wiDecide("close", true); });
    $("wi-close-cancel").addEventListener("click", function () {
      closeWiConfirm();
      $("wi-close").focus();
    });
    $("wi-item-hide").addEventListener("click", closeWiItem);
    $("wi-to").addEventListener("keydown", function (ev) { if (ev.key === "Enter") wiDecide("retry", false); });
  }

  // ------------------------------------------------------------------ budgets (operators)
  /* GET /v1/budgets (every budget with its ledgers in the window) and GET /v1/budgets/{name} (the same with
   * each ledger's burn-down series from this replica's decision records), every 10 s while shown. A bar per
   * ledger and the burn-down chart of the selected ledger are inline SVG (attributes and classes only: the
   * CSP allows no inline style). Budget names, key values and digests are text only. */
  var BG_POLL_MS = 10000;
  var BG_BAR = { w: 150, h: 14 };
  var BG_CHART = { w: 560, h: 240, left: 58, right: 46, top: 14, bottom: 40 };

  function openBudgets() {
    S.detailId = null;
    setView("budgets");
    loadBudgets(true);
    startViewPolling(loadBudgets, BG_POLL_MS);
  }

  function budgetsWindow() {
    return $("budgets-window").value === "previous" ? "previous" : "current";
  }

  function loadBudgets(force) {
    if (S.bg.loading && force !== true) return Promise.resolve();
    var gen = ++S.bg.gen;
    S.bg.loading = true;
    var win = budgetsWindow();
    var q = "?window=" + encodeURIComponent(win);
    return api("GET", "/v1/budgets" + q).then(function (doc) {
      if (gen !== S.bg.gen || S.view !== "budgets") return null;
      var budgets = (doc && Array.isArray(doc.budgets) ? doc.budgets : []).filter(function (b) {
        return isPlainObject(b) && typeof b.name === "string";
      });
      return Promise.all(budgets.map(function (b) {
        return api("GET", "/v1/budgets/" + encodeURIComponent(b.name) + q).then(
          function (d) { return isPlainObject(d) && isPlainObject(d.budget) ? d : { budget: b, burn_down: null }; },
          function (e) {
            if (e instanceof ApiError && e.status === 401) throw e;
            return { budget: b, burn_down: null, error: e.message };
          });
      })).then(function (details) {
        if (gen !== S.bg.gen || S.view !== "budgets") return;
        showMsg("budgets-error", "");
        showMsg("budgets-readonly", "");
        showMsg("budgets-note", doc && doc.ledger_available === false ?
          "The ledger did not answer, so no spend is shown; see the proxy log." : "");
        S.bg.details = details;
        S.bg.now = doc && typeof doc.now === "string" ? doc.now : new Date().toISOString();
        renderBudgets();
      });
    }).catch(function (e) {
      if (gen !== S.bg.gen || authFailed(e) || S.view !== "budgets") return;
      if (e.status === 403) {
        S.bg.details = [];
        clear($("budget-cards"));
        show($("budgets-empty"), false);
        setText($("budgets-count"), "");
        showMsg("budgets-readonly", "Budgets are shown to operators only. " + e.message);
        return;
      }
      showMsg("budgets-error", "Could not load the budgets: " + e.message);
    }).then(function () {
      if (gen === S.bg.gen) S.bg.loading = false;
    });
  }

  function bgNum(v) {
    var n = typeof v === "string" ? parseFloat(v) : NaN;
    return isFinite(n) ? n : 0;
  }

  function bgKeyText(ledger) {
    var key = isPlainObject(ledger.key) ? ledger.key : {};
    var dims = Object.keys(key);
    var text = dims.length ? dims.map(function (d) { return d + "=" + (key[d] === null ? "(none)" : String(key[d])); }).join(", ")
      : "(shared)";
    return ledger.key_shortened ? text + ", \u2026" : text;
  }

  function bgMoney(amount, b) {
    return formatDecimal(amount) + (b.currency ? " " + b.currency : "");
  }

  function bgPercent(fraction) {
    var n = bgNum(fraction) * 100;
    return (n >= 100 ? Math.round(n) : Math.round(n * 10) / 10) + "%";
  }

  /* What the projection says, as a node: exhausted, runs out in ..., or not in this window. */
  function bgExhaustion(ledger, current) {
    var p = isPlainObject(ledger.projection) ? ledger.projection : null;
    if (!p) return el("span", { cls: "muted", data: { testid: "budget-exhaustion", state: "none" }, text: current ? "\u2014" : "window over" });
    if (p.exhausted) return el("span", { cls: "badge state-denied", data: { testid: "budget-exhaustion", state: "exhausted" }, text: "exhausted" });
    if (typeof p.exhaustion_at === "string") {
      return el("span", { cls: "bg-runs-out", data: { testid: "budget-exhaustion", state: "projected", at: p.exhaustion_at } },
        ["runs out ", timeNode(p.exhaustion_at, "rel")]);
    }
    return el("span", { cls: "muted", data: { testid: "budget-exhaustion", state: "not-this-window" },
      text: "not before the window ends" });
  }

  /* used / limit: spent, then reserved, on a track as wide as the limit; the soft threshold as a tick. */
  function bgBar(b, ledger) {
    var limit = bgNum(b.limit);
    var spent = bgNum(ledger.spent);
    var reserved = bgNum(ledger.reserved);
    var w = BG_BAR.w;
    var ws = limit > 0 ? Math.min(w, (spent / limit) * w) : 0;
    var wr = limit > 0 ? Math.min(w - ws, (reserved / limit) * w) : 0;
    var over = spent + reserved >= limit;
    var svg = svgEl("svg", { "class": "budget-bar", role: "img", width: w, height: BG_BAR.h, viewBox: "0 0 " + w + " " + BG_BAR.h,
      "data-testid": "budget-bar", "data-used": ledger.used_fraction || "0", "aria-label": bgPercent(ledger.used_fraction) + " used" }, [
      svgTitle(formatDecimal(ledger.spent) + " spent + " + formatDecimal(ledger.reserved) + " reserved of " + bgMoney(b.limit, b)),
      svgEl("rect", { "class": "bar-track", x: 0, y: 0, width: w, height: BG_BAR.h, rx: 3 }),
      svgEl("rect", { "class": "bar-spent" + (over ? " is-over" : ""), x: 0, y: 0, width: ws.toFixed(2), height: BG_BAR.h, rx: 3,
        "data-testid": "budget-bar-spent" }),
      svgEl("rect", { "class": "bar-reserved", x: ws.toFixed(2), y: 0, width: wr.toFixed(2), height: BG_BAR.h,
        "data-testid": "budget-bar-reserved" }),
    ]);
    if (b.soft_threshold) {
      var x = (bgNum(b.soft_threshold) * w).toFixed(2);
      svg.appendChild(svgEl("line", { "class": "bar-soft", x1: x, x2: x, y1: 0, y2: BG_BAR.h }));
    }
    return svg;
  }

  function renderBudgets() {
    var host = $("budget-cards");
    clear(host);
    var list = S.bg.details || [];
    show($("budgets-empty"), list.length === 0);
    setText($("budgets-count"), list.length ? list.length + (list.length === 1 ? " budget" : " budgets") : "");
    list.forEach(function (d, i) { host.appendChild(budgetCard(d, i)); });
  }

  function budgetCard(d, index) {
    var b = d.budget;
    var w = isPlainObject(b.window) ? b.window : {};
    var rows = (Array.isArray(b.ledgers) ? b.ledgers : []).filter(isPlainObject);
    var sel = S.bg.selected[b.name];
    if (!rows.some(function (l) { return l.key_digest === sel; })) sel = rows.length ? rows[0].key_digest : null;
    S.bg.selected[b.name] = sel;
    var tags = [el("span", { cls: "badge state-other", text: "per " + (b.period || "?") })];
    if (b.shadow) tags.push(el("span", { cls: "badge state-pending", text: "shadow" }));
    if (b.on_exceed === "hold") tags.push(el("span", { cls: "badge state-other", text: "over: held for a person" }));
    var card = el("section", { cls: "card budget-card", data: { name: b.name, testid: "budget-card" } }, [
      el("div", { cls: "toolbar" }, [el("h3", { cls: "grow mono budget-name", data: { testid: "budget-name" }, text: b.name })].concat(tags)),
      el("p", { cls: "muted budget-meta", data: { testid: "budget-meta" } }, [
        "Limit " + bgMoney(b.limit, b) + " per key and " + (b.period || "?") + " (" + (b.timezone || "UTC") + "), window ",
        el("span", { cls: "mono", data: { testid: "budget-window" }, text: w.id || "?" }),
        w.current ? ", ends " : ", ended ",
        w.end ? timeNode(w.end, "rel") : "\u2014",
        b.soft_threshold ? "; soft threshold " + bgPercent(b.soft_threshold) : "",
      ]),
    ]);
    if (d.error) card.appendChild(el("p", { cls: "error", text: "Could not load its burn-down: " + d.error }));
    if (!rows.length) {
      card.appendChild(el("p", { cls: "muted", data: { testid: "budget-no-spend" }, text: "No spend in this window." }));
      return card;
    }
    var tbody = el("tbody");
    rows.forEach(function (l) {
      var tr = el("tr", { cls: "budget-ledger" + (l.key_digest === sel ? " is-selected" : ""), attrs: { tabindex: "0" },
        data: { testid: "budget-ledger", digest: l.key_digest || "", spent: l.spent || "", reserved: l.reserved || "",
          used: l.used_fraction || "" } }, [
        el("td", { cls: "mono budget-key", text: bgKeyText(l) }),
        el("td", {}, [bgBar(b, l)]),
        el("td", { cls: "num", text: formatDecimal(l.spent) + " / " + bgMoney(b.limit, b) }),
        el("td", { cls: "num", text: formatDecimal(l.reserved) }),
        el("td", { cls: "num", text: bgPercent(l.used_fraction) }),
        el("td", {}, [bgExhaustion(l, !!w.current)]),
      ]);
      var pick = function () {
        S.bg.selected[b.name] = l.key_digest;
        card.parentNode.replaceChild(budgetCard(d, index), card);
      };
      tr.addEventListener("click", pick);
      tr.addEventListener("keydown", function (ev) { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); pick(); } });
      tbody.appendChild(tr);
    });
    card.appendChild(el("div", { cls: "scroll-x" }, [el("table", { cls: "grid compact budget-ledgers", data: { testid: "budget-ledgers" } }, [
      el("thead", {}, [el("tr", {}, ["Key", "Used", "Spent / limit", "Reserved", "Used %", "Projected exhaustion"].map(function (h) {
        return el("th", { text: h });
      }))]),
      tbody,
    ])]));
    if (b.ledgers_truncated) {
      card.appendChild(el("p", { cls: "muted", text: "More keys have spend than are listed (the API's limit)." }));
    }
    var ledger = rows.filter(function (l) { return l.key_digest === sel; })[0];
    card.appendChild(budgetChart(b, ledger, d.burn_down, index));
    return card;
  }

  function bgTick(v) {
    if (v === 0) return "0";
    if (Math.abs(v) >= 1000) return formatDecimal(String(Math.round(v)));
    return String(Math.round(v * 100) / 100);
  }

  /* The burn-down of one ledger over the window: this replica's bookings (a step line), the fleet's spend now
   * (a dot, with what is reserved above it), the limit, the soft threshold, and the projection to the end. */
  function budgetChart(b, ledger, source, index) {
    var w = b.window;
    var id = "bg-chart-" + index;
    var fig = el("figure", { cls: "chart budget-chart", data: { testid: "budget-chart", digest: ledger.key_digest || "" } }, [
      el("figcaption", {}, ["Burn-down of ", el("span", { cls: "mono", data: { testid: "budget-chart-key" }, text: bgKeyText(ledger) }),
        el("span", { cls: "muted", text: " (bookings: this replica; dot and projection: all replicas)" })]),
    ]);
    var t0 = Date.parse(w.start);
    var t1 = Date.parse(w.end);
    var tn = Math.min(Math.max(Date.parse(S.bg.now), t0), t1);
    if (isNaN(t0) || isNaN(t1) || t1 <= t0) {
      fig.appendChild(el("p", { cls: "chart-empty muted", text: "The window's times are missing." }));
      return fig;
    }
    var limit = bgNum(b.limit);
    var spent = bgNum(ledger.spent);
    var reserved = bgNum(ledger.reserved);
    var p = isPlainObject(ledger.projection) ? ledger.projection : null;
    var end = p ? bgNum(p.at_window_end) : null;
    var series = (Array.isArray(ledger.burn_down) ? ledger.burn_down : []).filter(isPlainObject).map(function (pt) {
      return [Date.parse(pt.time), bgNum(pt.spent)];
    }).filter(function (pt) { return !isNaN(pt[0]); });
    var max = Math.max(limit, spent + reserved, end || 0, series.reduce(function (m, pt) { return Math.max(m, pt[1]); }, 0));
    var step = niceStep(Math.max(max, 1e-9) * 1.05 / 4);
    var top = Math.ceil((max * 1.05) / step) * step;
    var c = BG_CHART;
    var pw = c.w - c.left - c.right;
    var ph = c.h - c.top - c.bottom;
    var x = function (t) { return (c.left + ((t - t0) / (t1 - t0)) * pw).toFixed(1); };
    var y = function (v) { return (c.top + ph - (v / top) * ph).toFixed(1); };
    var booked = series.length ? series[series.length - 1][1] : 0;
    var desc = bgKeyText(ledger) + ": " + formatDecimal(ledger.spent) + " spent and " + formatDecimal(ledger.reserved) +
      " reserved of " + bgMoney(b.limit, b) + " in " + w.id + "; " + formatDecimal(String(booked)) + " booked by this replica's requests" +
      (p ? (p.exhausted ? "; exhausted." : p.exhaustion_at ? "; at the rate so far it runs out at " + absTime(p.exhaustion_at) + "." :
        "; at the rate so far " + formatDecimal(p.at_window_end) + " by the window's end.") : ".");
    var svg = svgEl("svg", { "class": "chart-svg budget-chart-svg", role: "img", viewBox: "0 0 " + c.w + " " + c.h,
      id: id + "-svg", "data-testid": "budget-chart-svg", "aria-labelledby": id + "-title " + id + "-desc" });
    var title = svgTitle("Burn-down of " + b.name + " for " + bgKeyText(ledger));
    title.setAttribute("id", id + "-title");
    var d = svgEl("desc", { id: id + "-desc" });
    d.textContent = desc;
    svg.appendChild(title);
    svg.appendChild(d);
    var grid = svgEl("g", { "class": "y-axis", "aria-hidden": "true" });
    for (var v = 0; v <= top + step / 1e6; v += step) {
      grid.appendChild(svgEl("line", { "class": "grid-line", x1: c.left, x2: c.left + pw, y1: y(v), y2: y(v) }));
      grid.appendChild(svgText({ "class": "tick", x: c.left - 6, y: +y(v) + 4, "text-anchor": "end" }, bgTick(v)));
    }
    svg.appendChild(grid);
    var span = (t1 - t0) / 1000;
    var unit = span >= 2 * 86400 ? 86400 : 3600;
    svg.appendChild(svgEl("g", { "class": "axes", "aria-hidden": "true" }, [
      svgEl("line", { "class": "axis", x1: c.left, x2: c.left, y1: c.top, y2: c.top + ph }),
      svgEl("line", { "class": "axis", x1: c.left, x2: c.left + pw, y1: c.top + ph, y2: c.top + ph }),
      svgText({ "class": "tick x-tick", x: c.left, y: c.top + ph + 16, "text-anchor": "start" }, bucketLabel(w.start, unit)),
      svgText({ "class": "tick x-tick", x: c.left + pw, y: c.top + ph + 16, "text-anchor": "end" }, bucketLabel(w.end, unit)),
      svgText({ "class": "axis-title", x: 0, y: 0, "text-anchor": "middle", transform: "translate(12 " + (c.top + ph / 2) + ") rotate(-90)" },
        b.currency || "spent"),
    ]));
    svg.appendChild(svgEl("line", { "class": "budget-limit", "data-testid": "budget-limit-line", "data-value": b.limit,
      x1: c.left, x2: c.left + pw, y1: y(limit), y2: y(limit) }, [svgTitle("limit " + bgMoney(b.limit, b))]));
    svg.appendChild(svgText({ "class": "tick budget-limit-label", x: c.left + pw + 4, y: +y(limit) + 4 }, "limit"));
    if (b.soft_threshold) {
      var soft = limit * bgNum(b.soft_threshold);
      svg.appendChild(svgEl("line", { "class": "budget-soft", x1: c.left, x2: c.left + pw, y1: y(soft), y2: y(soft) },
        [svgTitle("soft threshold " + bgPercent(b.soft_threshold))]));
    }
    if (w.current) {
      svg.appendChild(svgEl("line", { "class": "budget-now", x1: x(tn), x2: x(tn), y1: c.top, y2: c.top + ph }, [svgTitle("now")]));
    }
    if (series.length) {
      var pts = [];
      series.forEach(function (pt, i) {
        if (i > 0) pts.push(x(pt[0]) + "," + y(series[i - 1][1]));
        pts.push(x(pt[0]) + "," + y(pt[1]));
      });
      svg.appendChild(svgEl("polyline", { "class": "line budget-spent", points: pts.join(" "), "data-testid": "budget-spent-line",
        "data-points": series.length, "data-last": String(booked) }, [svgTitle("booked by this replica: " + formatDecimal(String(booked)))]));
    }
    if (p && w.current) {
      svg.appendChild(svgEl("line", { "class": "line budget-projection", "data-testid": "budget-projection-line", "data-end": p.at_window_end,
        x1: x(tn), y1: y(spent + reserved), x2: x(t1), y2: y(end) }, [svgTitle("projected " + bgMoney(p.at_window_end, b) + " by the window's end")]));
      if (typeof p.exhaustion_at === "string" && !isNaN(Date.parse(p.exhaustion_at))) {
        svg.appendChild(svgEl("circle", { "class": "point budget-exhaustion-point", "data-testid": "budget-exhaustion-point",
          cx: x(Date.parse(p.exhaustion_at)), cy: y(limit), r: 4.5 }, [svgTitle("runs out " + absTime(p.exhaustion_at))]));
      }
    }
    if (w.current) {
      if (reserved > 0) {
        svg.appendChild(svgEl("line", { "class": "budget-reserved-mark", x1: x(tn), x2: x(tn), y1: y(spent), y2: y(spent + reserved) },
          [svgTitle(formatDecimal(ledger.reserved) + " reserved")]));
      }
      svg.appendChild(svgEl("circle", { "class": "point budget-fleet", "data-testid": "budget-fleet-point", "data-spent": ledger.spent,
        cx: x(tn), cy: y(spent), r: 4 }, [svgTitle("spent now (all replicas): " + bgMoney(ledger.spent, b))]));
    }
    fig.appendChild(svg);
    fig.appendChild(legend([["swatch-bg-spent", "booked here"], ["swatch-bg-fleet", "spent now (all replicas)"],
      ["swatch-bg-projection", "projection"], ["swatch-bg-limit", "limit"]]));
    fig.appendChild(el("p", { cls: "budget-projection-text", data: { testid: "budget-projection-text" } }, [bgExhaustion(ledger, !!w.current),
      p && !p.exhausted ? " \u00b7 " + formatDecimal(p.at_window_end) + " projected by the window's end at " + formatDecimal(p.rate_per_hour) +
        (b.currency ? " " + b.currency : "") + " per hour" : ""]));
    if (isPlainObject(source) && source.complete === false) {
      fig.appendChild(el("p", { cls: "muted", data: { testid: "budget-series-partial" },
        text: "This replica's records were read back only to " + (source.since ? absTime(source.since) : "an unknown time") + "." }));
    }
    return fig;
  }

  function initBudgets() {
    $("budgets-window").addEventListener("change", function () { loadBudgets(true); });
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
    else if (S.view === "activity") loadActivity();
    else if (S.view === "agents") loadAgents();
    else if (S.view === "claims") loadClaims();
    else if (S.view === "handoffs") loadHandoffs();
    else if (S.view === "duplicates") loadDuplicates();
    else if (S.view === "workflows") loadWorkflows();
    else if (S.view === "workflow-inbox") loadWorkflowInbox();
    else if (S.view === "budgets") loadBudgets();
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
    Array.prototype.forEach.call($("nav").querySelectorAll("a"), function (a) {
      a.addEventListener("click", function (ev) {
        if (ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.altKey) return;
        ev.preventDefault();
        navigate(a.getAttribute("href"));
      });
    });
    initActivity();
    initAgents();
    initClaims();
    initHandoffs();
    initWorkflows();
    initWorkflowInbox();
    initBudgets();
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
