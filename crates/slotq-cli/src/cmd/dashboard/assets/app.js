// The slotq dashboard: draws each picture the server sends over /api/events.
// Everything that comes from the cluster (queue names, payloads, headers, reasons) goes
// into the page as text, never as HTML.
"use strict";

const token = new URLSearchParams(location.hash.slice(1)).get("token");
const cards = new Map(); // queue name -> its card's parts
let writes = false;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

function fmt(n) {
  if (n == null) return "–";
  if (n >= 1e6) return (n / 1e6).toFixed(n >= 1e7 ? 1 : 2) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return String(Math.round(n));
}

function api(path, init) {
  const headers = Object.assign({}, (init && init.headers) || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  return fetch(path, Object.assign({}, init, { headers })).then(async (r) => {
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.error || r.status + " " + r.statusText);
    return body;
  });
}

function act(path, body) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Slotq-Action": "1" },
    body: JSON.stringify(body),
  });
}

function problem(text) {
  const p = document.getElementById("problem");
  p.hidden = !text;
  p.textContent = text || "";
}

function drawMasters(s) {
  const box = document.getElementById("masters");
  box.replaceChildren();
  for (const m of s.masters) {
    const replicas = m.replicas.length
      ? m.replicas.map((r) => el("li", { class: "h-" + r.health, text: r.addr + " (" + r.health + ")" }))
      : [el("li", { class: "muted", text: "no replica" })];
    box.append(
      el("div", { class: "master h-" + m.health, "data-master": m.addr },
        el("div", { class: "addr", text: m.addr }),
        el("div", { class: "muted", text: m.slots + " slots · " + m.health }),
        el("div", { class: "ranges", text: m.ranges || "no slots" }),
        el("div", { class: "slotbar" }, el("span", { style: "width:" + (100 * m.slots / 16384).toFixed(1) + "%" })),
        el("ul", { class: "replicas" }, ...replicas)));
  }
  const gaps = s.uncovered ? " · UNCOVERED " + s.uncovered : " · all slots covered";
  document.getElementById("cluster-summary").textContent = s.masters.length + " masters" + gaps;
}

function card(q) {
  let c = cards.get(q.name);
  if (c) return c;
  c = {
    root: el("article", { class: "queue", "data-queue": q.name }),
    head: el("div", { class: "qhead" }),
    chart: el("canvas", { class: "chart", width: 640, height: 120, "data-testid": "chart" }),
    shards: el("div", { class: "shards", "data-testid": "shards" }),
    groups: el("div", { class: "groups", "data-testid": "groups" }),
    dead: el("div", { class: "dead", "data-testid": "dead" }),
    deadOpen: false,
  };
  c.root.append(c.head, c.chart, c.shards, c.groups, c.dead);
  document.getElementById("queues").append(c.root);
  cards.set(q.name, c);
  return c;
}

function sum(shards, f) {
  return shards.reduce((a, s) => a + (s[f] || 0), 0);
}

function drawHead(c, q) {
  const depth = sum(q.shards, "depth");
  const dead = sum(q.shards, "dead");
  const kids = [
    el("h3", { text: q.name }),
    el("span", { class: "badge", text: q.mode }),
    q.paused ? el("span", { class: "badge paused", text: "paused", "data-testid": "paused" }) : null,
    el("span", { class: "stat" }, "depth ", el("b", { text: String(depth), "data-testid": "depth-total" })),
    q.mode === "at-least-once"
      ? el("span", { class: "stat" }, "in flight ", el("b", { text: fmt(sum(q.shards, "in_flight")) }))
      : null,
    q.mode === "at-least-once"
      ? el("span", { class: "stat" }, "dead ", el("b", { text: String(dead), "data-testid": "dead-total" }))
      : null,
    el("span", { class: "stat" }, "scheduled ", el("b", { text: fmt(sum(q.shards, "scheduled")) })),
    el("span", { class: "stat in" }, "in ", el("b", { text: fmt(q.in_rate) + "/s", "data-testid": "in-rate" })),
    el("span", { class: "stat out" }, "out ", el("b", { text: fmt(q.out_rate) + "/s", "data-testid": "out-rate" })),
    el("span", { class: "muted", text: q.shards.length + " shards · v" + q.version }),
  ];
  if (writes) {
    kids.push(q.paused
      ? el("button", { text: "Resume", onclick: () => act("/api/resume", { queue: q.name }).catch((e) => problem(e.message)) })
      : el("button", { text: "Pause", onclick: () => act("/api/pause", { queue: q.name }).catch((e) => problem(e.message)) }));
  }
  c.head.replaceChildren(...kids.filter((k) => k != null));
}

function drawChart(c, q) {
  const cv = c.chart;
  const g = cv.getContext("2d");
  const w = cv.width, h = cv.height;
  g.clearRect(0, 0, w, h);
  const pts = q.history || [];
  g.fillStyle = "#8a8f98";
  g.font = "11px sans-serif";
  if (pts.length < 2) {
    g.fillText("messages in and out per second appear here", 8, h / 2);
    return;
  }
  const t0 = pts[0][0], t1 = pts[pts.length - 1][0];
  const top = Math.max(1, ...pts.map((p) => Math.max(p[1], p[2])));
  const x = (t) => 40 + (w - 48) * (t - t0) / Math.max(1, t1 - t0);
  const y = (v) => h - 14 - (h - 24) * v / top;
  for (const [i, color] of [[1, "#2f80ed"], [2, "#27ae60"]]) {
    g.strokeStyle = color;
    g.lineWidth = 1.5;
    g.beginPath();
    pts.forEach((p, k) => (k ? g.lineTo(x(p[0]), y(p[i])) : g.moveTo(x(p[0]), y(p[i]))));
    g.stroke();
  }
  g.fillText(fmt(top) + "/s", 2, 12);
  g.fillText("0", 2, h - 14);
  g.fillText(Math.round((t1 - t0) / 1000) + " s", w - 40, h - 2);
  g.fillStyle = "#2f80ed"; g.fillText("in", 44, 12);
  g.fillStyle = "#27ae60"; g.fillText("out", 62, 12);
}

function drawShards(c, q) {
  const byNode = new Map();
  for (const s of q.shards) {
    if (!byNode.has(s.node)) byNode.set(s.node, []);
    byNode.get(s.node).push(s);
  }
  const top = Math.max(1, ...q.shards.map((s) => s.depth + (s.in_flight || 0) + (s.dead || 0)));
  const rows = [];
  for (const [node, shards] of [...byNode.entries()].sort()) {
    rows.push(el("div", { class: "node", text: node || "(no master)" }));
    for (const s of shards) {
      const part = (n, cls) => el("span", { class: cls, style: "width:" + (100 * (n || 0) / top).toFixed(2) + "%" });
      const nums = s.tag + " · " + s.depth + " ready" +
        (s.in_flight != null ? " · " + s.in_flight + " in flight" : "") +
        (s.dead ? " · " + s.dead + " dead" : "") +
        (s.state !== "active" ? " · " + s.state : "");
      rows.push(el("div", { class: "shard", "data-shard": s.tag, "data-depth": String(s.depth) },
        el("div", { class: "bar" }, part(s.depth, "ready"), part(s.in_flight, "flight"), part(s.dead, "deadbar")),
        el("div", { class: "label", text: nums })));
    }
  }
  c.shards.replaceChildren(...rows);
}

function drawGroups(c, q) {
  if (!q.groups.length) {
    c.groups.replaceChildren(el("div", { class: "muted", text: "no consumer groups" }));
    return;
  }
  const rows = [el("tr", {}, ...["group", "member", "shards", "lag", "heartbeat"].map((t) => el("th", { text: t })))];
  for (const g of q.groups) {
    rows.push(el("tr", { class: "group", "data-group": g.name },
      el("td", { text: g.mode ? g.name + " (" + g.mode + ")" : g.name }), el("td", { text: g.members.length + (g.members.length === 1 ? " member" : " members") }),
      el("td", { text: "" }), el("td", { text: fmt(g.lag) }), el("td", { text: "" })));
    for (const m of g.members) {
      rows.push(el("tr", {}, el("td", {}), el("td", { class: "mono", text: m.id }),
        el("td", { text: String(m.shards.length) }), el("td", { text: fmt(m.lag) }),
        el("td", { text: (m.expires_in_ms / 1000).toFixed(1) + " s left" })));
    }
  }
  c.groups.replaceChildren(el("table", {}, ...rows));
}

function drawDeadBar(c, q) {
  if (q.mode !== "at-least-once") {
    c.dead.replaceChildren();
    return;
  }
  if (c.deadBar && c.deadBar.isConnected) {
    c.deadCount.textContent = String(sum(q.shards, "dead"));
    return;
  }
  c.deadCount = el("b", { text: String(sum(q.shards, "dead")) });
  c.deadList = el("div", { class: "deadlist" });
  const buttons = [el("button", { text: "Show dead letters", "data-testid": "show-dead", onclick: () => loadDead(c, q.name) })];
  if (writes) {
    buttons.push(el("button", { text: "Replay all", onclick: () => act("/api/dead/replay", { queue: q.name, all: true }).then(() => loadDead(c, q.name)).catch((e) => problem(e.message)) }));
    buttons.push(el("button", { class: "danger", text: "Purge", onclick: () => {
      if (confirm("Delete every dead letter of " + q.name + "?")) act("/api/dead/purge", { queue: q.name }).then(() => loadDead(c, q.name)).catch((e) => problem(e.message));
    } }));
  }
  c.deadBar = el("div", { class: "deadbar-head" }, el("span", {}, "Dead letters: ", c.deadCount), ...buttons);
  c.dead.replaceChildren(c.deadBar, c.deadList);
}

function loadDead(c, name) {
  api("/api/dead?queue=" + encodeURIComponent(name) + "&limit=50").then((r) => {
    if (!r.dead.length) {
      c.deadList.replaceChildren(el("div", { class: "muted", text: "no dead letters", "data-testid": "no-dead" }));
      return;
    }
    const rows = [el("tr", {}, ...["id", "reason", "detail", "died", "deliveries", "payload", ""].map((t) => el("th", { text: t })))];
    for (const d of r.dead) {
      const died = d.died_ms ? new Date(d.died_ms).toISOString().replace("T", " ").slice(0, 19) : "–";
      const headers = d.headers.length ? " [" + d.headers.map((h) => h[0] + "=" + h[1]).join(", ") + "]" : "";
      rows.push(el("tr", { "data-dead-id": d.id },
        el("td", { class: "mono", text: d.id }), el("td", { text: d.reason }), el("td", { text: d.detail }),
        el("td", { text: died }), el("td", { text: String(d.deliveries) }),
        el("td", { class: "mono preview", text: (d.binary ? "(binary " + d.bytes + " bytes) " : "") + d.preview + headers }),
        el("td", {}, writes ? el("button", { text: "Replay", "data-testid": "replay", onclick: () =>
          act("/api/dead/replay", { queue: name, ids: [d.id] }).then(() => loadDead(c, name)).catch((e) => problem(e.message)) }) : null)));
    }
    c.deadList.replaceChildren(el("table", {}, ...rows));
  }).catch((e) => problem(e.message));
}

function draw(s) {
  writes = s.writes;
  document.getElementById("cluster-url").textContent = s.cluster_url;
  const mode = document.getElementById("mode");
  mode.textContent = writes ? "writes allowed" : "read-only";
  mode.className = "badge " + (writes ? "paused" : "");
  drawMasters(s);
  const seen = new Set();
  for (const q of s.queues) {
    seen.add(q.name);
    const c = card(q);
    drawHead(c, q);
    drawChart(c, q);
    drawShards(c, q);
    drawGroups(c, q);
    drawDeadBar(c, q);
  }
  for (const [name, c] of cards) {
    if (!seen.has(name)) {
      c.root.remove();
      cards.delete(name);
    }
  }
  document.getElementById("queue-summary").textContent =
    s.queues.length + " queues" + (s.errors.length ? " · " + s.errors.length + " unreadable" : "");
  problem(s.errors.length ? "could not read: " + s.errors.join("; ") : "");
  document.getElementById("updated").textContent = new Date(s.at_ms).toLocaleTimeString();
  document.getElementById("read-time").textContent = s.read_seconds.toFixed(3);
}

function connect() {
  const live = document.getElementById("live");
  const src = new EventSource("/api/events" + (token ? "?token=" + encodeURIComponent(token) : ""));
  src.onopen = () => { live.textContent = "live"; live.className = "badge on"; };
  src.onmessage = (ev) => {
    try { draw(JSON.parse(ev.data)); } catch (e) { problem("bad picture: " + e.message); }
  };
  src.onerror = () => {
    live.textContent = "reconnecting";
    live.className = "badge off";
    // EventSource reconnects by itself; a refused token does not heal: say so once.
    api("/api/snapshot").catch((e) => problem(e.message));
  };
}

connect();
