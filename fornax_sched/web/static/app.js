// fornax-sched's page: the dashboard and the policy builder.  Plain JS, no build step.
// Everything goes through /api (docs/web.8.md).  A change carries the token in the X-Fornax-Token
// header (never a cookie); the token comes from the URL's #token=... (which no server sees) or the
// token field, and is kept in this tab's sessionStorage only.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ESC[c]);
const KEY = "fornax-token";

let token = sessionStorage.getItem(KEY) || "";
(function takeTokenFromUrl() {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) {
    token = decodeURIComponent(m[1]);
    sessionStorage.setItem(KEY, token);
    history.replaceState(null, "", location.pathname + location.search);
  }
})();

async function api(path, body) {
  const headers = {};
  if (token) headers["X-Fornax-Token"] = token;
  const opts = { headers, cache: "no-store" };
  if (body !== undefined) {
    opts.method = "POST";
    headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let r;
  try {
    r = await fetch(path, opts);
  } catch (e) {
    return { ok: false, status: 0, data: { error: `the scheduler cannot be reached: ${e.message}` } };
  }
  let data;
  try { data = await r.json(); } catch (e) { data = { error: `${r.status} ${r.statusText}` }; }
  return { ok: r.ok, status: r.status, data };
}

function say(text, bad) {
  const box = $("#answer");
  $("#answer-text").textContent = text;
  box.classList.toggle("error", !!bad);
  box.classList.remove("hidden");
  box.dataset.kind = bad ? "error" : "ok";
}
$("#answer-close").onclick = () => $("#answer").classList.add("hidden");

// ------------------------------------------------------------------ tabs and token
for (const b of $$(".tab")) {
  b.onclick = () => {
    for (const t of $$(".tab")) t.classList.toggle("active", t === b);
    for (const v of $$(".view")) v.classList.toggle("hidden", v.id !== b.dataset.tab);
    if (b.dataset.tab === "builder") builderShown();
  };
}
$("#token").value = token;
$("#token-form").onsubmit = (e) => {
  e.preventDefault();
  token = $("#token").value.trim();
  if (token) sessionStorage.setItem(KEY, token); else sessionStorage.removeItem(KEY);
  refresh();
};

// ------------------------------------------------------------------ the dashboard
const size = (b) => {
  if (b === null || b === undefined) return "-";
  const units = ["", "K", "M", "G", "T"];
  let i = 0, v = Math.max(b, 0);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i ? v.toFixed(v < 10 ? 1 : 0) : String(v)) + units[i];
};
const age = (s) => s >= 172800 ? `${Math.floor(s / 86400)}d` : s >= 7200 ? `${Math.floor(s / 3600)}h`
  : s >= 120 ? `${Math.floor(s / 60)}m` : `${Math.floor(s)}s`;

let state = null;
let selected = "";  // the placement the row actions act on (one click on its row)

function renderCards(st) {
  const count = (rows, key) => rows.reduce((m, r) => { const k = r[key].split(" ")[0]; m[k] = (m[k] || 0) + 1; return m; }, {});
  const words = (m) => Object.entries(m).sort().map(([k, v]) => `${v} ${k}`).join(", ") || "none";
  const cards = [
    ["nodes", st.nodes.length, words(count(st.nodes, "status"))],
    ["placements", st.total, words(count(st.placements, "status"))],
    ["drift", st.drift.open.length, `${st.drift.resolved.length} resolved, ${st.drift.passes} passes`],
    ["mode", st.health.mode, st.health.reason || `since ${st.health.modeChangedAt}`],
    ["leader", st.replicated ? (st.leader || "none") : "this scheduler", st.replicated ? (st.leading ? "this replica leads" : "this replica follows") : "one scheduler, no replicas"],
    ["policy", st.policy.label, st.policy.health || `version ${st.policy.version}`],
  ];
  $("#cards").innerHTML = cards.map(([h, v, s]) =>
    `<div class="card" data-card="${esc(h)}"><span class="muted">${esc(h)}</span><b>${esc(v)}</b><span class="muted">${esc(s)}</span></div>`).join("");
}

function renderNodes(st) {
  $("#nodes tbody").innerHTML = st.nodes.map((n) => {
    const s = n.status.split(" ")[0];
    return `<tr data-node="${esc(n.name)}"><td>${esc(n.name)}</td><td>${esc(n.kind)}</td>` +
      `<td class="status-${esc(s)}">${esc(n.status)}</td>` +
      `<td><meter min="0" max="${n.cpus}" value="${n.cpus_reserved}"></meter> ${n.cpus_reserved} / ${n.cpus}</td>` +
      `<td><meter min="0" max="${n.mem}" value="${n.mem_reserved}"></meter> ${size(n.mem_reserved)} / ${size(n.mem)}</td>` +
      `<td>${size(n.mem_used)}</td><td>${n.load === null ? "-" : n.load.toFixed(2)}</td><td>${n.containers}</td>` +
      `<td><button data-do="${n.status.includes("cordoned") ? "uncordon" : "cordon"}" data-arg="${esc(n.name)}">` +
      `${n.status.includes("cordoned") ? "uncordon" : "cordon"}</button> ` +
      `<button data-do="evacuate" data-arg="${esc(n.name)}">evacuate</button>` +
      (s === "dead" ? ` <button data-do="forget" data-arg="${esc(n.name)}">forget</button>` : "") + `</td></tr>`;
  }).join("");
  const opts = st.nodes.map((n) => `<option>${esc(n.name)}</option>`).join("");
  for (const sel of ["#act-from", "#act-to"]) {
    const el = $(sel), keep = el.value;
    el.innerHTML = opts;
    if (keep) el.value = keep;
  }
  const f = $("#f-node"), keep = f.value;
  f.innerHTML = `<option value="">any node</option><option value="-">none (waiting)</option>` + opts;
  f.value = keep;
}

function renderPlacements(st) {
  const name = $("#f-name").value.trim(), node = $("#f-node").value, status = $("#f-status").value;
  let re = null;
  if (/[*?[]/.test(name)) {
    try {
      re = new RegExp("^" + name.replace(/[.+^${}()|\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".") + "$");
    } catch (e) { re = null; }
  }
  const rows = st.placements.filter((p) => (!name || (re ? re.test(p.name) : p.name.includes(name)))
    && (!node || p.node === node) && (!status || p.status === status));
  // One string, one assignment: a thousand rows are laid out once (no per-row requests or inserts).
  const html = new Array(rows.length);
  for (let i = 0; i < rows.length; i++) {
    const p = rows[i], n = esc(p.name);
    const want = p.want === "run" ? "" : ` (${esc(p.want)})`;
    const why = esc(p.why || "");
    html[i] = `<div role="row" class="prow ${esc(p.status)}${p.name === selected ? " sel" : ""}" data-name="${n}" data-want="${esc(p.want)}" ` +
      `data-node="${esc(p.node)}" data-group="${esc(p.group)}"><span><a href="#" data-show="${n}">${n}</a></span>` +
      `<span${i ? "" : ' elementtiming="placements"'}>${esc(p.image)}</span><span>${esc(p.node)}</span><span>${esc(p.status)}${want}</span>` +
      `<span>${age(p.age_s)}</span><span class="why"${why ? ` title="${why}"` : ""}>${why}</span></div>`;
  }
  $("#prows").innerHTML = html.join("");
  select(selected ? $(`#prows .prow[data-name="${CSS.escape(selected)}"]`) : null);
  $("#shown").textContent = `${rows.length} shown of ${st.total}` + (st.total > st.placements.length ? ` (the first ${st.placements.length} sent)` : "");
  const statuses = [...new Set(st.placements.map((p) => p.status))].sort();
  const f = $("#f-status"), keep = f.value;
  f.innerHTML = `<option value="">any status</option>` + statuses.map((s) => `<option>${esc(s)}</option>`).join("");
  f.value = statuses.includes(keep) ? keep : "";
  $("#names").innerHTML = st.groups.map((g) => `<option>${esc(g.group)}</option>`).join("") +
    (st.placements.length <= 2000 ? st.placements.map((p) => `<option>${esc(p.name)}</option>`).join("") : "");
  if (!document.body.dataset.placementsShown && !renderPlacements.marking) {
    // When the first table was painted (the frame after it was laid out): the dashboard benchmark reads it.
    renderPlacements.marking = true;
    requestAnimationFrame(() => setTimeout(() => { document.body.dataset.placementsShown = String(performance.now()); }));
  }
}

function renderRest(st) {
  $("#groups tbody").innerHTML = st.groups.map((g) =>
    `<tr><td>${esc(g.group)}</td><td>${g.wanted}</td><td>${g.running}</td><td>${g.pending}</td><td>${g.other}</td></tr>`).join("");
  const drift = [...st.drift.open, ...st.drift.resolved];
  $("#drift tbody").innerHTML = drift.map((d) => `<tr><td>${esc(d.kind)}</td><td>${esc(d.node)}</td><td>${esc(d.name)}</td>` +
    `<td class="why">${esc(d.detail)}${d.resolved ? " (resolved)" : ""}</td><td>${new Date(d.since * 1000).toISOString().slice(0, 19)}Z</td></tr>`).join("")
    || `<tr><td colspan="5" class="muted">no drift found</td></tr>`;
  $("#drift-head").textContent = st.drift.last ? `last compared ${st.drift.last}` : "";
  const mode = $("#mode");
  mode.textContent = `mode ${st.health.mode}`;
  mode.className = `badge ${st.health.mode}`;
  mode.title = st.mode;
  $("#leader").textContent = st.replicated ? `leader ${st.leader || "none"}${st.leading ? " (this replica)" : ""}` : "";
  $("#policy-label").textContent = `policy ${st.policy.label}`;
  $("#who").textContent = st.you ? `you: ${st.you}${st.writers.includes(st.you) ? "" : " (not a writer)"}` : (token ? "" : "reading only");
}

let refreshing = null;
async function refresh() {
  if (refreshing) return refreshing;
  refreshing = (async () => {
    const r = await api("/api/state");
    if (!r.ok) { say(r.data.error || `state: ${r.status}`, true); return; }
    state = r.data;
    renderPlacements(state);
    renderNodes(state);
    renderCards(state);
    renderRest(state);
  })().finally(() => { refreshing = null; });
  return refreshing;
}
for (const id of ["#f-name", "#f-node", "#f-status"]) $(id).addEventListener("input", () => state && renderPlacements(state));

async function ctl(command) {
  const r = await api("/api/ctl", { command });
  if (r.ok) say(`${command}\n\n${r.data.answer}`); else say(`${command}\n\n${r.data.error}`, true);
  refresh();
  return r;
}

// Row actions act on the selected placement: one bar, not four buttons on each of a thousand rows.
function select(row) {
  for (const r of $$("#prows .prow.sel")) r.classList.remove("sel");
  selected = row ? row.dataset.name : "";
  if (row) row.classList.add("sel");
  const bar = $("#row-actions");
  $("#sel-name").textContent = selected || "none: click a row";
  for (const b of $$("button", bar)) {
    b.disabled = !row;
    if (!row) continue;
    b.dataset.arg = b.dataset.fill === "scale" ? row.dataset.group : selected;
    if (b.dataset.fill === "migrate") b.dataset.from = row.dataset.node;
  }
  $("#row-stop").classList.toggle("hidden", !!row && row.dataset.want !== "run");
  $("#row-start").classList.toggle("hidden", !row || row.dataset.want === "run");
}
$("#prows").addEventListener("click", (e) => {
  const row = e.target.closest(".prow");
  if (row && !e.target.closest("a")) select(row);
});

document.addEventListener("click", async (e) => {
  const b = e.target.closest("[data-do],[data-fill],[data-show]");
  if (!b) return;
  e.preventDefault();
  if (b.dataset.do) {
    ctl(`${b.dataset.do} ${b.dataset.arg}`);
  } else if (b.dataset.fill) {
    $("#act-verb").value = b.dataset.fill;
    $("#act-target").value = b.dataset.arg;
    if (b.dataset.from && b.dataset.from !== "-") $("#act-from").value = b.dataset.from;
    actChanged();
    $("#act-form").scrollIntoView({ block: "center" });
  } else if (b.dataset.show) {
    const r = await api(`/api/placements/${encodeURIComponent(b.dataset.show)}`);
    const d = $("#detail");
    d.textContent = r.ok ? `${r.data.name}\n${r.data.text}` : r.data.error;
    d.classList.remove("hidden");
  }
});

// place
const quote = (w) => /^[A-Za-z0-9_.,:=@%+\/*?!<>\[\]-]+$/.test(w) ? w : `'${w.replace(/'/g, `'"'"'`)}'`;
function placeCommand() {
  const f = $("#place-form"), v = (n) => f.elements[n].value.trim();
  const words = ["place", v("image") || "IMAGE"];
  if (v("name")) words.push(`name=${v("name")}`);
  if (v("replicas") && v("replicas") !== "1") words.push(`replicas=${v("replicas")}`);
  if (v("cpu")) words.push(`cpu>=${v("cpu")}`);
  if (v("mem")) words.push(`mem>=${v("mem")}`);
  for (const l of v("labels").split(/\s+/).filter(Boolean)) words.push(l);
  for (const g of v("node").split(/\s+/).filter(Boolean)) words.push(`node=${g}`);
  for (const g of v("avoid").split(/\s+/).filter(Boolean)) words.push(`node!=${g}`);
  for (const g of v("anti").split(/\s+/).filter(Boolean)) words.push(`anti-affinity=${g}`);
  if (v("restart")) words.push(`restart=${v("restart")}`);
  for (const e of v("env").split(/\s+/).filter(Boolean)) words.push(`env:${e}`);
  const args = v("args");
  return words.map(quote).join(" ") + (args ? ` -- ${args}` : "");
}
$("#place-form").addEventListener("input", () => { $("#place-cmd").textContent = placeCommand(); });
$("#place-form").onsubmit = (e) => { e.preventDefault(); ctl(placeCommand()); };
$("#place-sim").onclick = async () => {
  const cmd = placeCommand(), r = await api("/api/policy/simulate", { place: cmd });
  say(r.ok ? r.data.answer : r.data.error, !r.ok);
};

// act
function actCommand() {
  const verb = $("#act-verb").value, t = $("#act-target").value.trim();
  if (verb === "migrate") return `migrate ${t} ${$("#act-from").value} ${$("#act-to").value}`;
  if (verb === "scale") return `scale ${t} ${$("#act-count").value || 0}`;
  if (verb === "rebalance") return `rebalance${$("#act-count").value ? " " + $("#act-count").value : ""}`;
  return `${verb} ${t}`;
}
function actChanged() {
  const verb = $("#act-verb").value;
  $("#act-from-l").classList.toggle("hidden", verb !== "migrate");
  $("#act-to-l").classList.toggle("hidden", verb !== "migrate");
  $("#act-count-l").classList.toggle("hidden", verb !== "scale" && verb !== "rebalance");
  $("#act-target-l").classList.toggle("hidden", verb === "rebalance");
  $("#act-target-l").firstChild.textContent = ["cordon", "uncordon", "evacuate"].includes(verb) ? "node " : verb === "scale" ? "group " : "name ";
  $("#act-target").setAttribute("list", ["cordon", "uncordon", "evacuate"].includes(verb) ? "" : "names");
  $("#act-cmd").textContent = actCommand();
}
$("#act-form").addEventListener("input", actChanged);
$("#act-form").onsubmit = (e) => { e.preventDefault(); ctl(actCommand()); };
$("#ctl-form").onsubmit = (e) => { e.preventDefault(); const t = $("#ctl-text").value.trim(); if (t) ctl(t); };

// the log, live: server-sent events read through fetch (so that the token header can go along)
const LOG_KEPT = 2000;
// Lines are added a batch at a time (all those one read of the stream brought): one layout for the
// batch, not one a line, so that the 200 lines a new stream starts with cost no more than one.
function logLines(texts, fresh) {
  if (!texts.length) return;
  const box = $("#log"), atEnd = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
  const f = $("#log-filter").value, frag = document.createDocumentFragment();
  for (const text of texts) {
    const d = document.createElement("div");
    d.textContent = text;
    if (fresh) d.className = "new";
    if (f && !text.includes(f)) d.classList.add("hidden");
    frag.appendChild(d);
  }
  box.appendChild(frag);
  let extra = box.childElementCount - LOG_KEPT;
  while (extra-- > 0) box.firstElementChild.remove();
  if (atEnd) box.scrollTop = box.scrollHeight;
}
$("#log-filter").addEventListener("input", () => {
  const f = $("#log-filter").value;
  for (const d of $("#log").children) d.classList.toggle("hidden", !!f && !d.textContent.includes(f));
});
async function followLog() {
  let last = null, first = true;
  for (;;) {
    try {
      const headers = {};
      if (token) headers["X-Fornax-Token"] = token;
      if (last !== null) headers["Last-Event-ID"] = last;
      const r = await fetch("/api/log/stream", { headers, cache: "no-store" });
      if (!r.ok) throw new Error((await r.json().catch(() => ({}))).error || r.status);
      $("#log-state").textContent = "live";
      const reader = r.body.getReader(), dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let cut, batch = [];
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const event = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (line.startsWith("id: ")) last = line.slice(4);
            else if (line.startsWith("data: ")) batch.push(line.slice(6));
          }
          if (first && last !== null) {  // the lines kept end here: what follows is new
            logLines(batch, false);
            batch = [];
            first = false;
          }
        }
        logLines(batch, !first);
        if (!first && batch.length) refreshSoon();
      }
    } catch (e) {
      $("#log-state").textContent = `reconnecting (${e.message})`;
    }
    await new Promise((ok) => setTimeout(ok, 1000));
  }
}
let soon = null;
function refreshSoon() { if (!soon) soon = setTimeout(() => { soon = null; refresh(); }, 300); }

// ------------------------------------------------------------------ the policy builder
const REQ_FIELDS = ["image", "name", "cpus", "mem", "replicas", "labels."];
const NODE_FIELDS = ["name", "cpus", "mem", "free_cpus", "free_mem", "used_cpus", "used_mem", "containers", "labels."];
const NUMERIC = new Set(["cpus", "mem", "replicas", "free_cpus", "free_mem", "used_cpus", "used_mem", "containers"]);
const OPS = [["eq", "="], ["ne", "≠"], ["glob", "matches"], ["gt", ">"], ["ge", "≥"], ["lt", "<"], ["le", "≤"], ["in", "is one of"], ["exists", "exists"]];
const SELECTS = ["least-loaded", "most-loaded", "most-cpu-free", "most-mem-free", "least-cpu-free", "least-mem-free"];

let ruleSeq = 0;
const options = (list, keep) => list.map((o) => { const [v, t] = Array.isArray(o) ? o : [o, o === "labels." ? "label…" : o];
  return `<option value="${esc(v)}"${v === keep ? " selected" : ""}>${esc(t)}</option>`; }).join("");

function testRow(fields, t = {}) {
  const d = document.createElement("div");
  d.className = "row test";
  d.innerHTML = `<select class="t-field">${options(fields, t.field)}</select><input class="t-label" size="8" placeholder="label" value="${esc(t.label || "")}">` +
    `<select class="t-op">${options(OPS, t.op || "eq")}</select><input class="t-value" size="14" value="${esc(t.value ?? "")}"><button type="button" class="t-del" title="remove">&times;</button>`;
  const sync = () => d.querySelector(".t-label").classList.toggle("hidden", d.querySelector(".t-field").value !== "labels.");
  d.querySelector(".t-field").addEventListener("change", sync);
  d.querySelector(".t-del").onclick = () => { d.remove(); formChanged(); };
  sync();
  return d;
}

function addRule(r = {}) {
  ruleSeq++;
  const div = document.createElement("div");
  div.className = "rule";
  div.innerHTML = `<h3>rule <input class="r-name" size="16" value="${esc(r.name || `rule-${ruleSeq}`)}"> priority <input class="r-priority" type="number" size="5" value="${r.priority ?? 100 - ruleSeq * 10}">` +
    `<button type="button" class="r-del">remove</button></h3>` +
    `<div class="sub">when the request (none: always)</div><div class="r-when"></div><button type="button" class="r-add-when">+ request test</button>` +
    `<div class="sub">then</div><div class="row"><select class="r-action">${options([["dispatch", "dispatch to a node"], ["wait", "wait, saying why"], ["platform", "let the platform policy decide"]], r.action || "dispatch")}</select>` +
    `<select class="r-select">${options(SELECTS, r.select)}</select><input class="r-reason hidden" size="28" placeholder="why it waits" value="${esc(r.reason || "")}">` +
    `<label class="r-req"><input type="checkbox" class="r-required"${r.required ? " checked" : ""}> required</label></div>` +
    `<div class="r-nodes-box"><div class="sub">only nodes where</div><div class="r-nodes"></div><button type="button" class="r-add-node">+ node test</button>` +
    `<div class="sub">preferring nodes where</div><div class="r-prefer"></div><button type="button" class="r-add-prefer">+ preference</button></div>`;
  $("#rules").appendChild(div);
  for (const t of r.when || []) div.querySelector(".r-when").appendChild(testRow(REQ_FIELDS, t));
  for (const t of r.nodes || []) div.querySelector(".r-nodes").appendChild(testRow(NODE_FIELDS, t));
  for (const t of r.prefer || []) div.querySelector(".r-prefer").appendChild(testRow(NODE_FIELDS, t));
  div.querySelector(".r-add-when").onclick = () => { div.querySelector(".r-when").appendChild(testRow(REQ_FIELDS)); formChanged(); };
  div.querySelector(".r-add-node").onclick = () => { div.querySelector(".r-nodes").appendChild(testRow(NODE_FIELDS)); formChanged(); };
  div.querySelector(".r-add-prefer").onclick = () => { div.querySelector(".r-prefer").appendChild(testRow(NODE_FIELDS)); formChanged(); };
  div.querySelector(".r-del").onclick = () => { div.remove(); formChanged(); };
  const sync = () => {
    const a = div.querySelector(".r-action").value;
    div.querySelector(".r-select").classList.toggle("hidden", a !== "dispatch");
    div.querySelector(".r-req").classList.toggle("hidden", a !== "dispatch");
    div.querySelector(".r-nodes-box").classList.toggle("hidden", a !== "dispatch");
    div.querySelector(".r-reason").classList.toggle("hidden", a !== "wait");
  };
  div.querySelector(".r-action").addEventListener("change", sync);
  sync();
  formChanged();
  return div;
}

// YAML from the form.  Every text the user typed is written as a JSON string, which YAML reads as
// the same double-quoted scalar: nothing typed can change the document's structure.
const ystr = (s) => JSON.stringify(String(s));
function yvalue(field, op, raw) {
  const v = raw.trim();
  if (op === "exists") return /^(false|no|0)$/i.test(v) ? "false" : "true";
  const one = (x) => (NUMERIC.has(field) && /^-?\d+(\.\d+)?$/.test(x)) ? x : ystr(x);
  if (op === "in") return "[" + v.split(",").map((x) => one(x.trim())).filter((x) => x !== '""').join(", ") + "]";
  return one(v);
}
function ytests(box, prefix) {
  const byKey = new Map();
  for (const row of $$(".test", box)) {
    const field = $(".t-field", row).value, op = $(".t-op", row).value;
    const key = field === "labels." ? `${prefix}labels.${$(".t-label", row).value.trim()}` : prefix + field;
    if (!byKey.has(key)) byKey.set(key, []);
    byKey.get(key).push(`${op}: ${yvalue(field, op, $(".t-value", row).value)}`);
  }
  return [...byKey].map(([k, ops]) => `${/^[A-Za-z_.]+$/.test(k) ? k : ystr(k)}: {${ops.join(", ")}}`);
}
function formYaml() {
  const out = ["# Made with the policy builder of fornax-sched's web page.", "scheduler:", `  name: ${ystr($("#b-name").value.trim() || "my-policy")}`, "  rules:"];
  const rules = $$("#rules .rule");
  for (const r of rules) {
    out.push(`    - name: ${ystr($(".r-name", r).value.trim())}`);
    out.push(`      priority: ${/^-?\d+$/.test($(".r-priority", r).value.trim()) ? $(".r-priority", r).value.trim() : ystr($(".r-priority", r).value)}`);
    const when = ytests($(".r-when", r), "request.");
    if (when.length) { out.push("      condition:"); for (const t of when) out.push(`        ${t}`); } else out.push("      condition: always");
    const a = $(".r-action", r).value;
    out.push("      action:");
    if (a === "platform") out.push("        use: platform");
    else if (a === "wait") out.push(`        wait: ${ystr($(".r-reason", r).value.trim() || "held by a rule")}`);
    else {
      out.push("        dispatch:", `          select: ${$(".r-select", r).value}`);
      const nodes = ytests($(".r-nodes", r), ""), prefer = ytests($(".r-prefer", r), "");
      if (nodes.length) { out.push("          nodes:"); for (const t of nodes) out.push(`            ${t}`); }
      if (prefer.length) { out.push("          prefer:"); for (const t of prefer) out.push(`            ${t}`); }
      if ($(".r-required", r).checked) out.push("          required: true");
    }
  }
  if (!rules.length) out[out.length - 1] = "  rules: []  # add a rule";
  return out.join("\n") + "\n";
}

let compileTimer = null, compileSeq = 0;
function formChanged() {
  if (!$("#b-linked").checked) return;
  setCode(formYaml());
}
$("#rules-form").addEventListener("input", formChanged);
$("#rules-form").addEventListener("change", formChanged);
$("#rules-form").addEventListener("submit", (e) => e.preventDefault());
$("#add-rule").onclick = () => addRule();

const code = $("#code");
function setCode(text) { code.value = text; codeChanged(); }
function gutter(bad) {
  const n = code.value.split("\n").length;
  const lines = new Array(n);
  for (let i = 1; i <= n; i++) lines[i - 1] = i === bad ? `<span class="bad" data-line="${i}">${i}</span>` : String(i);
  $("#gutter").innerHTML = lines.join("\n");
  $("#gutter").scrollTop = code.scrollTop;
}
code.addEventListener("scroll", () => { $("#gutter").scrollTop = code.scrollTop; });
code.addEventListener("input", () => {
  if ($("#b-linked").checked) { $("#b-linked").checked = false; }  // written by hand now: the form lets go
  codeChanged();
});
$("#b-linked").addEventListener("change", () => { if ($("#b-linked").checked) setCode(formYaml()); });
function showError(r) {
  const box = $("#code-error");
  if (!r || r.ok) { box.classList.add("hidden"); box.textContent = ""; gutter(null); return; }
  box.textContent = (r.line ? (r.in === "lua" ? `line ${r.line} of the compiled Lua: ` : `line ${r.line}: `) : "") + r.error;
  box.classList.remove("hidden");
  gutter(r.in === "lua" ? null : r.line);
}
function codeChanged() {
  gutter(null);
  clearTimeout(compileTimer);
  compileTimer = setTimeout(async () => {
    const seq = ++compileSeq, r = await api("/api/policy/compile", { text: code.value });
    if (seq !== compileSeq) return;  // an older answer, after a newer request
    if (!r.ok) { showError({ ok: false, error: r.data.error }); return; }
    $("#code-kind").textContent = r.data.kind;
    if (r.data.ok) $("#lua").textContent = r.data.lua;
    $("#lua").classList.toggle("stale", !r.data.ok);
    showError(r.data);
  }, 250);
}

$("#validate").onclick = async () => {
  $("#builder-answer").textContent = "checking…";
  const r = await api("/api/policy/check", { text: code.value });
  const d = r.data;
  $("#builder-answer").textContent = r.ok ? (d.ok ? d.answer : d.error) : d.error;
  showError(r.ok ? d : { ok: false, error: d.error });
};
$("#simulate").onclick = async () => {
  $("#builder-answer").textContent = "simulating…";
  const r = await api("/api/policy/simulate", { text: code.value, place: $("#sim-place").value });
  $("#builder-answer").textContent = r.ok ? r.data.answer : r.data.error;
  if (!r.ok) showError({ ok: false, ...r.data, error: r.data.error });
};
$("#deploy").onclick = async () => {
  $("#builder-answer").textContent = "deploying…";
  const r = await api("/api/policy", { text: code.value });
  $("#builder-answer").textContent = r.ok ? r.data.answer : r.data.error;
  showError(r.ok ? null : { ok: false, ...r.data });
  loadPolicy();
  refresh();
};

async function loadPolicy() {
  const r = await api("/api/policy");
  if (!r.ok) return;
  const p = r.data;
  $("#active-source").textContent = p.source;
  $("#active-version").textContent = `active: v${p.version} (${p.label})`;
  $("#history tbody").innerHTML = p.history.map((v) => `<tr data-version="${v.n}"><td>${v.active ? "<b>v" + v.n + "</b> (active)" : "v" + v.n}</td>` +
    `<td>${esc(v.at)}</td><td>${esc(v.kind)}</td><td>${esc(v.by)}</td><td>${esc(v.title)}</td><td><button data-open="${v.n}">open</button>` +
    (v.active ? "" : ` <button data-restore="${v.n}">restore</button>`) + `</td></tr>`).join("")
    || `<tr><td colspan="6" class="muted">no policy written yet: the default, spread, is active</td></tr>`;
}
$("#history").addEventListener("click", async (e) => {
  const b = e.target.closest("button");
  if (!b) return;
  if (b.dataset.open) {
    const r = await api(`/api/policy/history/${b.dataset.open}`);
    if (r.ok) { $("#b-linked").checked = false; setCode(r.data.source); }
  } else if (b.dataset.restore) {
    const r = await api("/api/policy/restore", { version: Number(b.dataset.restore) });
    $("#builder-answer").textContent = r.ok ? r.data.answer : r.data.error;
    loadPolicy();
    refresh();
  }
});

let templatesLoaded = false;
async function loadTemplates() {
  templatesLoaded = true;
  const r = await api("/api/templates");
  if (!r.ok) { templatesLoaded = false; return; }
  const list = r.data.templates;
  $("#templates").innerHTML = list.map((t, i) => `<li><button data-template="${i}">load</button> <b>${esc(t.name)}</b> <span class="muted">${esc(t.kind)}: ${esc(t.about)}</span></li>`).join("");
  $("#templates").onclick = (e) => {
    const b = e.target.closest("[data-template]");
    if (!b) return;
    $("#b-linked").checked = false;
    setCode(list[Number(b.dataset.template)].source);
  };
}

let builderMade = false;
function builderShown() {
  if (!templatesLoaded) loadTemplates();
  if (!builderMade) {  // made when first shown: the dashboard does not wait for it
    builderMade = true;
    addRule({ name: "web-on-ssd", priority: 100, when: [{ field: "image", op: "glob", value: "web*" }], select: "least-loaded",
              nodes: [{ field: "labels.", label: "disk", op: "eq", value: "ssd" }] });
  }
  loadPolicy();
  if (!code.value) formChanged();
}

// ------------------------------------------------------------------ start
refresh();
followLog();
actChanged();
$("#place-cmd").textContent = placeCommand();
setInterval(() => { if (!document.hidden) refresh(); }, 2000);
