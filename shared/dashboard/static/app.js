// The tunebus dashboard: one page, hash routes, JSON from /api, live updates from /api/live
// (server-sent events). Every value is put in the page as text, never as HTML.
"use strict";

const main = document.getElementById("main");
let me = { operator: false, submitter: false };
let page = { onEvent: null, chart: null };

// -- small helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  let body;
  try { body = await response.json(); } catch { body = { error: `${response.status} ${response.statusText}` }; }
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function post(path, body) {
  return api(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body || {}) });
}

function toast(text, bad = false) {
  const el = document.getElementById("toast");
  el.textContent = text; el.className = bad ? "bad" : ""; el.hidden = false;
  clearTimeout(toast.timer); toast.timer = setTimeout(() => { el.hidden = true; }, bad ? 8000 : 4000);
}

const fmt = {
  num: (v, digits = 3) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits)),
  int: (v) => (v === null || v === undefined ? "–" : Math.round(v).toLocaleString()),
  age: (s) => {
    if (s === null || s === undefined) return "–";
    if (s < 60) return `${Math.round(s)}s`;
    if (s < 3600) return `${Math.round(s / 60)}m`;
    if (s < 86400) return `${(s / 3600).toFixed(1)}h`;
    return `${(s / 86400).toFixed(1)}d`;
  },
  time: (iso) => (iso ? new Date(iso).toLocaleString() : "–"),
  pct: (v) => (v === null || v === undefined ? "–" : `${v >= 0 ? "+" : ""}${(v * 100).toFixed(1)}%`),
};

function state(text, phase) { return h("span", { class: `state ${phase || text}` }, text); }

function kv(pairs) {
  return h("dl", { class: "kv" }, Object.entries(pairs).filter(([, v]) => v !== undefined).flatMap(
    ([k, v]) => [h("dt", {}, k), h("dd", {}, v === null ? "–" : v instanceof Node || typeof v !== "object" ? v : JSON.stringify(v))]));
}

function debounce(fn, ms) {
  let timer = null;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

function failed(error) { main.replaceChildren(h("p", { class: "error" }, String(error.message || error))); }

// -- live events

function connectLive() {
  const dot = document.getElementById("live");
  const source = new EventSource("/api/live");
  source.addEventListener("ready", () => dot.classList.add("on"));
  source.addEventListener("bus", (e) => { if (page.onEvent) page.onEvent(JSON.parse(e.data)); });
  source.onerror = () => dot.classList.remove("on");
}

// -- pages

async function jobsPage() {
  const body = h("tbody");
  main.replaceChildren(h("h1", {}, "Jobs"), h("table", { id: "jobs" },
    h("thead", {}, h("tr", {}, ["job", "state", "adapter", "method", "backend", "step", "loss", "tok/s", "registered", "age"].map((c) => h("th", {}, c)))),
    body));
  async function load() {
    const { jobs } = await api("/api/jobs");
    body.replaceChildren(...jobs.map((j) => h("tr", { class: "click", "data-job": j.job_id, onclick: () => { location.hash = `#/jobs/${encodeURIComponent(j.job_id)}`; } },
      h("td", { class: "mono" }, j.job_id), h("td", {}, state(j.state, j.phase)), h("td", {}, j.adapter || "–"),
      h("td", {}, j.method || "–"), h("td", {}, j.backend || "–"),
      h("td", { class: "num" }, j.step === null ? "–" : `${j.step}/${j.total_steps}`),
      h("td", { class: "num" }, fmt.num(j.loss)), h("td", { class: "num" }, fmt.int(j.tokens_per_second)),
      h("td", {}, j.ref ? h("a", { href: `#/adapters/${encodeURIComponent(j.ref)}`, onclick: (e) => e.stopPropagation() }, j.ref) : "–"),
      h("td", { class: "num" }, fmt.age(j.age_seconds)))));
    if (!jobs.length) body.replaceChildren(h("tr", {}, h("td", { colspan: 10, class: "muted" }, "No jobs yet: submit one.")));
  }
  const reload = debounce(() => load().catch((e) => toast(e.message, true)), 300);
  page.onEvent = () => reload();
  await load();
}

async function jobPage(jobId) {
  const job = await api(`/api/jobs/${encodeURIComponent(jobId)}`);
  const { points } = await api(`/api/jobs/${encodeURIComponent(jobId)}/curve`);
  const header = h("div");
  const timeline = h("div", { class: "timeline", id: "timeline" });
  const chartBox = h("div", { id: "chart" });
  const details = h("div", { class: "grid" });
  const report = h("div", { id: "report-box" });
  main.replaceChildren(h("h1", {}, "Job ", h("span", { class: "mono" }, jobId)), header, timeline,
    h("h2", {}, "Training curve"), chartBox, details, report);

  const curve = { points: points.slice() };
  function drawHeader(j) {
    header.replaceChildren(h("p", {}, state(j.state, j.phase), " ", h("span", { id: "job-state", "data-phase": j.phase }, j.state), "  ",
      h("span", { class: "muted" }, `${j.adapter || "?"} on ${j.base_model || "?"} · ${j.method || "sft"} · ${j.backend || "backend pending"}${j.worker ? ` (${j.worker})` : ""}`),
      j.ref ? h("span", {}, " · registered ", h("a", { href: `#/adapters/${encodeURIComponent(j.ref)}`, id: "job-ref" }, j.ref)) : null));
    timeline.replaceChildren(...j.timeline.map((s) => h("div", { class: `stage ${s.state}`, "data-stage": s.stage },
      h("div", { class: "name" }, s.stage), h("div", {}, s.state, s.seconds !== null ? ` · ${s.seconds.toFixed(1)}s` : ""),
      h("div", { class: "detail" }, s.detail || ""))));
  }
  function drawDetails(j) {
    const ds = j.dataset;
    const cards = [
      h("div", { class: "card" }, h("h2", {}, "Progress"), kv({ step: j.step === null ? null : `${j.step}/${j.total_steps}`,
        "train loss": fmt.num(j.loss), "val loss": fmt.num(j.val_loss), "tokens/s": fmt.int(j.tokens_per_second),
        ETA: j.eta_seconds ? fmt.age(j.eta_seconds) : null })),
      ds ? h("div", { class: "card", id: "dataset" }, h("h2", {}, "Dataset"), kv({ format: ds.format, rows: ds.rows,
        train: ds.train_rows, valid: ds.valid_rows, dropped: ds.dropped, invalid: ds.invalid_rows, sha256: (ds.sha256 || "").slice(0, 16) + "…",
        tokens: ds.token_stats ? JSON.stringify(ds.token_stats) : null }),
        ds.warnings && ds.warnings.length ? h("div", {}, h("h2", {}, `Warnings (${ds.warning_count || ds.warnings.length})`),
          h("ul", {}, ds.warnings.map((w) => h("li", {}, w)))) : h("p", { class: "muted" }, "No warnings.")) : null,
      j.evaluation ? h("div", { class: "card", id: "evaluation" }, h("h2", {}, "Evaluation"), j.evaluation.skipped ? h("p", {}, "Turned off in the request.") :
        h("table", {}, h("tr", {}, h("th", {}, "metric"), h("th", {}, "base"), h("th", {}, "base + adapter"), h("th", {}, "change")),
          ["loss", "perplexity"].filter((m) => j.evaluation.before && j.evaluation.before[m] !== undefined).map((m) => h("tr", {},
            h("td", {}, m), h("td", { class: "num" }, fmt.num(j.evaluation.before[m])), h("td", { class: "num" }, fmt.num(j.evaluation.after[m])),
            h("td", { class: "num" }, fmt.pct((j.evaluation.relative_change || {})[m])))))) : null,
      j.resolved_args ? h("div", { class: "card" }, h("h2", {}, "Resolved arguments"), h("pre", { id: "resolved-args" }, JSON.stringify(j.resolved_args, null, 2))) : null,
      j.refusals.length ? h("div", { class: "card" }, h("h2", {}, "Refused later requests"), h("ul", {}, j.refusals.map((r) => h("li", {}, r)))) : null,
    ];
    details.replaceChildren(...cards.filter(Boolean));
    if (j.has_report && !report.querySelector("iframe")) {
      report.replaceChildren(h("h2", {}, "Evaluation report ", h("a", { href: `/api/jobs/${encodeURIComponent(jobId)}/report` }, "(open)")),
        h("iframe", { class: "report", sandbox: "allow-scripts", src: `/api/jobs/${encodeURIComponent(jobId)}/report`, title: "evaluation report" }));
    }
  }
  function drawChart() {
    const pts = curve.points;
    if (!pts.length) { chartBox.replaceChildren(h("p", { class: "muted" }, "No progress yet.")); page.chart = null; return; }
    const rewards = pts.some((p) => p.reward !== null && p.reward !== undefined);
    const data = [pts.map((p) => p.step), pts.map((p) => p.train_loss), pts.map((p) => p.val_loss), pts.map((p) => p.learning_rate)];
    if (rewards) data.push(pts.map((p) => p.reward));
    if (page.chart) { page.chart.setData(data); return; }
    chartBox.replaceChildren();
    const series = [{ label: "step" },
      { label: "train loss", stroke: "#2563eb", width: 2, scale: "loss" },
      { label: "val loss", stroke: "#f97316", width: 2, scale: "loss", points: { show: true } },
      { label: "learning rate", stroke: "#16a34a", width: 1, dash: [4, 4], scale: "lr" }];
    if (rewards) series.push({ label: "reward", stroke: "#9333ea", width: 2, scale: "loss" });
    page.chart = new uPlot({ width: Math.min(chartBox.clientWidth || 900, 1250) - 10, height: 280, series,
      scales: { x: { time: false } },
      axes: [{ label: "step" }, { scale: "loss", label: rewards ? "loss / reward" : "loss" },
        { scale: "lr", side: 1, label: "learning rate", grid: { show: false }, values: (u, vals) => vals.map((v) => v.toExponential(1)), size: 70 }] },
    data, chartBox);
  }
  drawHeader(job); drawDetails(job); drawChart();

  const refresh = debounce(async () => {
    try { const j = await api(`/api/jobs/${encodeURIComponent(jobId)}`); drawHeader(j); drawDetails(j); } catch (e) { toast(e.message, true); }
  }, 200);
  page.onEvent = (event) => {
    if (event.job_id !== jobId) return;
    if (event.point) {
      const i = curve.points.findIndex((p) => p.step >= event.point.step);
      if (i === -1) curve.points.push(event.point);
      else if (curve.points[i].step === event.point.step) curve.points[i] = event.point;
      else curve.points.splice(i, 0, event.point);
      drawChart();
    }
    refresh();
  };
}

async function adaptersPage() {
  const { adapters } = await api("/api/adapters");
  main.replaceChildren(h("h1", {}, "Adapters"), adapters.length ? h("table", { id: "adapters" },
    h("thead", {}, h("tr", {}, ["version", "aliases", "method", "train loss", "eval loss (base → adapter)", "change", "base model", "dataset", "job", "registered"].map((c) => h("th", {}, c)))),
    h("tbody", {}, adapters.flatMap((a) => a.versions.map((v) => h("tr", { class: "click", "data-ref": v.ref, onclick: () => { location.hash = `#/adapters/${encodeURIComponent(v.ref)}`; } },
      h("td", { class: "mono" }, v.ref), h("td", {}, v.aliases.map((al) => state(al, al === "production" ? "ok" : ""))),
      h("td", {}, v.method), h("td", { class: "num" }, fmt.num(v.final_loss)),
      h("td", { class: "num" }, v.eval_loss_before === null ? "–" : `${fmt.num(v.eval_loss_before)} → ${fmt.num(v.eval_loss_after)}`),
      h("td", { class: "num" }, fmt.pct(v.relative_change.loss)), h("td", { class: "mono" }, v.lineage.base_model),
      h("td", { class: "mono" }, v.lineage.dataset_uri || "–"),
      h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(v.lineage.job_id)}`, onclick: (e) => e.stopPropagation() }, v.lineage.job_id)),
      h("td", {}, fmt.time(v.created_at))))))) : h("p", { class: "muted" }, "No adapters registered yet."));
  page.onEvent = (e) => { if (e.type === "tunebus.adapter.registered.v1") adaptersPage().catch(failed); };
}

async function adapterPage(ref) {
  const a = await api(`/api/adapters/${encodeURIComponent(ref)}`);
  const actions = h("p", { id: "actions" });
  if (me.operator) {
    actions.append(
      h("button", { id: "promote", disabled: a.aliases.includes("production"), onclick: () => act("promote", { ref: a.ref }, `Put ${a.ref} in production?`) }, "Promote to production"), " ",
      h("button", { id: "rollback", class: "secondary", onclick: () => act("rollback", { name: a.name }, `Point production of ${a.name} back at the version it held before?`) }, "Roll back production"), " ",
      h("button", { id: "delete", class: "danger", disabled: a.deleted, onclick: () => act("delete", { ref: a.ref }, `Delete ${a.ref}? (soft: its record and files stay)`) }, "Delete version"));
  } else actions.append(h("span", { class: "muted" }, "Promote, roll back and delete need an operator identity."));
  async function act(what, body, question) {
    if (!confirm(question)) return;
    try { await post(`/api/adapters/${what}`, body); toast(`${what}: done`); await adapterPage(ref); } catch (e) { toast(e.message, true); }
  }
  main.replaceChildren(
    h("h1", {}, "Adapter ", h("span", { class: "mono" }, a.ref), " ", a.aliases.map((al) => state(al, al === "production" ? "ok" : "")), a.deleted ? state("deleted", "bad") : null),
    actions,
    h("div", { class: "grid" },
      h("div", { class: "card" }, h("h2", {}, "Version"), kv({ method: a.method, backend: a.backend, "trained as": a.format, layouts: a.formats.join(", "),
        "train loss": fmt.num(a.final_loss), "eval loss": a.eval_loss_before === null ? null : `${fmt.num(a.eval_loss_before)} → ${fmt.num(a.eval_loss_after)} (${fmt.pct(a.relative_change.loss)})`,
        regressed: a.regressed ? "yes" : "no", registered: fmt.time(a.created_at), promotion: a.promotion ? `${a.promotion.promoted ? "promoted" : "not promoted"}: ${a.promotion.reason}` : null })),
      h("div", { class: "card" }, h("h2", {}, "Lineage"), kv({ job: h("a", { href: `#/jobs/${encodeURIComponent(a.lineage.job_id)}` }, a.lineage.job_id),
        "base model": a.lineage.base_model, revision: a.lineage.base_model_revision, dataset: a.lineage.dataset_uri, format: a.lineage.dataset_format,
        rows: a.lineage.dataset_rows, tags: a.lineage.tags.join(", ") || null }))),
    h("h2", {}, "Download"), h("p", { class: "muted" }, "Presigned links (they expire); compare each file's sha256 before use."),
    ...Object.entries(a.downloads).map(([layout, files]) => h("div", { class: "card", "data-layout": layout }, h("h2", {}, `${layout} layout`),
      h("table", {}, files.map((f) => h("tr", {}, h("td", {}, h("a", { href: f.url, download: f.file }, f.file)), h("td", { class: "num" }, fmt.int(f.size)), h("td", { class: "mono" }, (f.sha256 || "").slice(0, 16) + "…")))))));
}

async function servicesPage() {
  const { services } = await api("/api/services");
  main.replaceChildren(h("h1", {}, "Services"), h("table", { id: "services" },
    h("thead", {}, h("tr", {}, ["service", "instance", "health", "version", "backend", "active jobs", "restarts", "up since", "requests (errors)"].map((c) => h("th", {}, c)))),
    h("tbody", {}, services.map((s) => h("tr", { "data-service": s.name },
      h("td", {}, s.name), h("td", { class: "mono" }, s.id), h("td", {}, s.healthy ? state("ok", "ok") : state("stalled", "bad"), s.problems.length ? h("div", { class: "error" }, s.problems.join("; ")) : null),
      h("td", {}, s.version), h("td", {}, s.backend || "–"), h("td", { class: "mono" }, s.active_jobs.join(", ") || "–"),
      h("td", { class: "num" }, s.restarts ?? "–"), h("td", {}, fmt.time(s.started)),
      h("td", {}, s.endpoints.map((e) => h("div", { class: "mono" }, `${e.name}: ${e.requests} (${e.errors})`))))))),
    services.length ? null : h("p", { class: "error" }, "No service answered discovery."));
  page.onEvent = null;
}

async function deadLettersPage(params) {
  const service = params.get("service") || "", reason = params.get("reason") || "";
  const form = h("form", { class: "filters", onsubmit: (e) => { e.preventDefault(); const q = new URLSearchParams(new FormData(form)); location.hash = `#/deadletters?${q}`; } },
    h("select", { name: "service" }, ["", "dataset-validator", "trainer", "evaluator", "adapter-registry"].map((s) => h("option", { value: s, selected: s === service }, s || "any service"))),
    h("input", { name: "reason", placeholder: "reason or error contains…", value: reason }), h("button", {}, "Filter"));
  const { dead_letters: rows } = await api(`/api/deadletters?${new URLSearchParams({ service, reason })}`);
  main.replaceChildren(h("h1", {}, "Dead letters"), form, rows.length ? h("table", { id: "deadletters" },
    h("thead", {}, h("tr", {}, ["id", "time", "service", "job", "original subject", "reason", "deliveries"].map((c) => h("th", {}, c)))),
    h("tbody", {}, rows.map((d) => h("tr", { class: "click", "data-id": d.id, onclick: () => { location.hash = `#/deadletters/${d.id}`; } },
      h("td", { class: "num" }, d.id), h("td", {}, fmt.time(d.time)), h("td", {}, d.service), h("td", { class: "mono" }, d.job_id),
      h("td", { class: "mono" }, d.original_subject), h("td", {}, d.reason, d.replay_of ? h("span", { class: "muted" }, ` (replay of ${d.replay_of})`) : null),
      h("td", { class: "num" }, d.deliveries))))) : h("p", { class: "muted" }, "No dead letters" + (service || reason ? " match." : ".")));
  page.onEvent = (e) => { if (e.type === "tunebus.deadletter.v1") deadLettersPage(params).catch(failed); };
}

async function deadLetterPage(id) {
  const d = await api(`/api/deadletters/${id}`);
  const replay = me.operator ? h("button", { id: "replay", onclick: async () => {
    if (!confirm(`Publish dead letter ${id} again on ${d.original_subject}?`)) return;
    try { const r = await post(`/api/deadletters/${id}/replay`, {}); toast(r.duplicate ? `already replayed (stream sequence ${r.stream_sequence})` : `replayed to ${r.subject} (stream sequence ${r.stream_sequence})`); }
    catch (e) { toast(e.message, true); }
  } }, "Replay") : h("span", { class: "muted" }, "Replaying needs an operator identity.");
  main.replaceChildren(h("h1", {}, `Dead letter ${id}`), h("p", {}, replay),
    h("div", { class: "grid" }, h("div", { class: "card" }, kv({ time: fmt.time(d.time), service: d.service, job: d.job_id, subject: d.original_subject,
      reason: d.reason, deliveries: d.deliveries, "stream sequence": d.stream_sequence, size: d.body_size, "replay of": d.replay_of })),
      h("div", { class: "card" }, h("h2", {}, "Errors"), d.errors.length ? h("ul", {}, d.errors.map((e) => h("li", { class: "mono" }, e))) : h("p", { class: "muted" }, "none"),
        h("h2", {}, "Headers"), kv(d.headers))),
    h("h2", {}, "Original message", d.body_complete ? "" : ` (first bytes of ${d.body_size})`), h("pre", { id: "body" }, d.body));
  page.onEvent = null;
}

function submitPage() {
  const field = (label, input) => [h("label", {}, label), input];
  const form = h("form", { id: "submit-form", class: "form-grid", onsubmit: (e) => e.preventDefault() },
    field("dataset file", h("input", { type: "file", name: "dataset", required: true })),
    field("adapter name", h("input", { name: "adapter_name", value: "my-adapter", required: true })),
    field("base model", h("input", { name: "base_model", value: "s3://tunebus-models/tiny-llama", size: 40 })),
    field("method", h("select", { name: "method" }, ["sft", "dpo", "orpo", "cpo", "grpo"].map((m) => h("option", { value: m }, m)))),
    field("backend", h("select", { name: "backend" }, ["auto", "mlx", "cuda"].map((m) => h("option", { value: m }, m)))),
    field("iterations", h("input", { name: "iters", type: "number", min: 1, value: 100 })),
    field("learning rate", h("input", { name: "learning_rate", value: "0.0002" })),
    field("batch size", h("input", { name: "batch_size", type: "number", min: 1, value: 4 })),
    field("max sequence length", h("input", { name: "max_seq_length", type: "number", min: 8, value: 2048 })),
    field("LoRA rank", h("input", { name: "rank", type: "number", min: 1, value: 8 })));
  const report = h("div", { id: "validation" });
  const check = h("button", { id: "check" }, "Upload and check");
  const start = h("button", { id: "start", disabled: true }, "Start job");
  let uploaded = null;
  check.onclick = async () => {
    const data = new FormData(form);
    if (!data.get("dataset") || !data.get("dataset").name) { toast("choose a dataset file", true); return; }
    check.disabled = true; start.disabled = true; report.replaceChildren(h("p", { class: "muted" }, "uploading and validating…"));
    try {
      const up = await api("/api/datasets", { method: "POST", body: (() => { const f = new FormData(); f.append("dataset", data.get("dataset")); return f; })() });
      const r = await post("/api/validate", { uri: up.uri, method: data.get("method"), base_model: data.get("base_model") });
      uploaded = up;
      report.replaceChildren(h("h2", {}, r.valid ? "Valid" : "Not valid", " ", state(r.valid ? "valid" : "invalid", r.valid ? "ok" : "bad")),
        r.reason ? h("p", { class: "error" }, r.reason) : null,
        kv({ uploaded: up.uri, format: r.format, rows: r.rows, "train / valid": `${r.train_rows} / ${r.valid_rows}`, methods: (r.methods || []).join(", ") }),
        r.errors && r.errors.length ? h("table", { id: "validation-errors" }, h("tr", {}, h("th", {}, "file"), h("th", {}, "line"), h("th", {}, "field"), h("th", {}, "message")),
          r.errors.map((e) => h("tr", {}, h("td", { class: "mono" }, e.file || ""), h("td", { class: "num" }, e.line ?? e.index ?? ""), h("td", { class: "mono" }, e.field || ""), h("td", {}, e.message)))) : null,
        r.warnings && r.warnings.length ? h("ul", {}, r.warnings.map((w) => h("li", {}, typeof w === "string" ? w : w.message || JSON.stringify(w)))) : null);
      start.disabled = !r.valid || !me.submitter;
    } catch (e) { report.replaceChildren(h("p", { class: "error" }, e.message)); }
    finally { check.disabled = false; }
  };
  start.onclick = async () => {
    const data = Object.fromEntries(new FormData(form));
    delete data.dataset;
    try {
      const r = await post("/api/jobs", { ...data, job_id: uploaded.job_id, dataset_uri: uploaded.uri, iters: Number(data.iters), batch_size: Number(data.batch_size),
        learning_rate: Number(data.learning_rate), max_seq_length: Number(data.max_seq_length), rank: Number(data.rank) });
      location.hash = `#/jobs/${encodeURIComponent(r.job_id)}`;
    } catch (e) { toast(e.message, true); }
  };
  main.replaceChildren(h("h1", {}, "Submit a job"), me.submitter ? null : h("p", { class: "error" }, "This dashboard's identity may not submit jobs."),
    form, h("p", {}, check, " ", start), report);
  page.onEvent = null;
}

// -- routing

async function route() {
  page.onEvent = null; page.chart = null;
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const name = parts[0] || "jobs";
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === name);
  try {
    if (name === "jobs" && parts[1]) await jobPage(parts[1]);
    else if (name === "adapters" && parts[1]) await adapterPage(parts[1]);
    else if (name === "adapters") await adaptersPage();
    else if (name === "services") await servicesPage();
    else if (name === "deadletters" && parts[1]) await deadLetterPage(parts[1]);
    else if (name === "deadletters") await deadLettersPage(new URLSearchParams(query || ""));
    else if (name === "submit") submitPage();
    else await jobsPage();
  } catch (e) { failed(e); }
}

(async () => {
  try {
    me = await api("/api/whoami");
    document.getElementById("whoami").textContent = `${me.user} @ ${me.nats}`;
  } catch (e) { toast(e.message, true); }
  connectLive();
  window.addEventListener("hashchange", route);
  route();
})();
