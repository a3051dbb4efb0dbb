// The dashboard: reads the master's JSON API (the sign-in cookie goes along) and draws tables
// and a job's timeline. No framework, no build step.
"use strict";

const STATE_COLOURS = {
  QUEUED: "#b9a3df", PROVISIONING: "#9f86cf", STARTING: "#8a6fc0", RUNNING: "#4caf6a",
  PREEMPTED: "#f0a030", COMPLETED: "#3b7dd8", FAILED: "#d04848", CANCELLED: "#999999",
};
const EVENT_STATES = {
  queued: "QUEUED", requeued: "QUEUED", provisioning: "PROVISIONING", starting: "STARTING", running: "RUNNING",
  preempted: "PREEMPTED", "machine-lost": "PREEMPTED", moved: "PREEMPTED", completed: "COMPLETED",
  failed: "FAILED", cancelled: "CANCELLED",
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

async function api(path) {
  const response = await fetch(path, { credentials: "same-origin" });
  if (response.status === 401) { location.href = "/"; throw new Error("signed out"); }
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

const money = (usd) => (usd === null || usd === undefined ? "" : `$${usd.toFixed(usd < 1 ? 4 : 2)}`);
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");
const bytes = (n) => (n >= 1 << 30 ? `${(n / (1 << 30)).toFixed(1)} GiB` : n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB`
  : n >= 1024 ? `${(n / 1024).toFixed(1)} KiB` : `${n} B`);
const state = (name) => el("span", { class: `state ${name}` }, name);

function fill(table, rows) {
  const body = document.querySelector(`#${table} tbody`);
  body.replaceChildren(...rows.map((cells) => el("tr", {}, ...cells.map((c) => el("td", {}, c)))));
}

function progressCell(job) {
  if (job.progress === null || job.progress === undefined) return job.state === "COMPLETED" ? "done" : "";
  return el("progress", { max: "1", value: String(job.progress), title: `${Math.round(job.progress * 100)}%` });
}

async function jobsPage() {
  const [{ jobs }, { machines, offers }] = await Promise.all([api("/api/jobs"), api("/api/machines")]);
  fill("jobs", jobs.slice().reverse().map((job) => [
    el("a", { href: `/jobs/${job.id}` }, job.id), job.name || "", state(job.state), progressCell(job),
    job.restarts, job.preemptions, job.checkpoints, money(job.cost_so_far), money(job.ondemand_cost),
    when(job.deadline_at),
  ]));
  fill("machines", machines.map((m) => [m.instance_id || "(launching)", el("a", { href: `/jobs/${m.job_id}` }, m.job_id),
    m.market, m.zone, m.instance_type, m.price.toFixed(4), when(m.launched_at)]));
  fill("offers", offers.map((o) => [o.zone, o.instance_type, o.spot_price.toFixed(4), o.ondemand_price.toFixed(4),
    o.available ? "yes" : "none"]));
}

function timeline(job) {
  // three lanes over the job's life: its states, the machines it used, its checkpoints
  const start = new Date(job.submitted_at).getTime();
  const end = job.finished_at ? new Date(job.finished_at).getTime() : Date.now();
  const width = 1000, left = 110, lane = 34, height = 3 * lane + 40;
  const x = (t) => left + ((t - start) / Math.max(end - start, 1)) * (width - left - 10);
  const chart = svg("svg", { width: "100%", viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `timeline of job ${job.id}` });
  ["state", "machines", "checkpoints"].forEach((name, i) => chart.append(svg("text", { x: 8, y: 22 + i * lane }, name)));
  const changes = job.events.filter((e) => EVENT_STATES[e.kind]);
  changes.forEach((event, i) => {
    const from = new Date(event.at).getTime();
    const to = i + 1 < changes.length ? new Date(changes[i + 1].at).getTime() : end;
    const name = EVENT_STATES[event.kind];
    const bar = svg("rect", { x: x(from), y: 8, width: Math.max(x(to) - x(from), 2), height: 20,
      fill: STATE_COLOURS[name], class: `segment ${name}` });
    bar.append(svg("title", {}, `${name} from ${when(event.at)}: ${event.detail}`));
    chart.append(bar);
  });
  job.machines.forEach((m) => {
    if (!m.launched_at) return;
    const from = new Date(m.launched_at).getTime();
    const to = m.terminated_at ? new Date(m.terminated_at).getTime() : end;
    const bar = svg("rect", { x: x(from), y: 8 + lane, width: Math.max(x(to) - x(from), 2), height: 20,
      fill: m.market === "spot" ? "#6fa8dc" : "#a4c2f4", stroke: "#fff", class: "machine" });
    bar.append(svg("title", {}, `${m.instance_id}: ${m.market} ${m.instance_type} in ${m.zone} at $${m.price}/h` +
      (m.reason ? ` (ended: ${m.reason})` : "")));
    chart.append(bar);
  });
  job.checkpoint_list.forEach((c) => {
    const at = new Date(c.created_at).getTime();
    const tick = svg("rect", { x: x(at) - 2, y: 8 + 2 * lane, width: 4, height: 20, fill: c.bad ? "#d04848" : "#1d2430",
      class: "checkpoint" });
    tick.append(svg("title", {}, `${c.id} (${c.reason}): ${bytes(c.size_bytes)}, ${bytes(c.new_bytes)} new, ` +
      `${(c.pause_seconds + c.upload_seconds).toFixed(2)} s`));
    chart.append(tick);
  });
  chart.append(svg("text", { x: left, y: height - 6 }, when(job.submitted_at)));
  chart.append(svg("text", { x: width - 10, y: height - 6, "text-anchor": "end" }, when(new Date(end).toISOString())));
  return chart;
}

async function jobPage(jobId) {
  const job = await api(`/api/jobs/${encodeURIComponent(jobId)}`);
  document.getElementById("job-id").textContent = job.id;
  const badge = document.getElementById("job-state");
  badge.textContent = job.state;
  badge.className = `state ${job.state}`;
  document.getElementById("summary").textContent =
    `${job.name || ""} · attempt ${job.attempt}, ${job.restarts} restarts, ${job.preemptions} preemptions, ` +
    `${job.checkpoints} checkpoints · cost ${money(job.cost_so_far)}` +
    (job.ondemand_cost ? ` (on demand: ${money(job.ondemand_cost)})` : "") +
    (job.deadline_at ? ` · deadline ${when(job.deadline_at)}` : "") + (job.error ? ` · ${job.error}` : "") +
    (job.last_checkpoint_error ? ` · last checkpoint failed: ${job.last_checkpoint_error}` : "");
  for (const stream of ["stdout", "stderr"]) document.getElementById(stream).href = `/api/jobs/${job.id}/logs/${stream}`;
  document.getElementById("output").href = `/api/jobs/${job.id}/output`;
  document.getElementById("timeline").replaceChildren(timeline(job));
  fill("checkpoints", job.checkpoint_list.slice().reverse().map((c) => [c.id + (c.bad ? " (bad)" : ""), c.reason,
    bytes(c.size_bytes), bytes(c.new_bytes), `${c.pause_seconds.toFixed(2)} s`, `${c.upload_seconds.toFixed(2)} s`,
    when(c.created_at)]));
  fill("events", job.events.slice().reverse().map((e) => [when(e.at), e.kind, e.detail]));
  document.querySelectorAll("#events td:last-child").forEach((td) => td.classList.add("detail"));
  document.querySelectorAll("#events tr").forEach((tr) => {
    if (tr.children[1] && tr.children[1].textContent === "checkpoint-failed") tr.classList.add("failed");
  });
}

async function refresh() {
  const page = document.body.dataset.page;
  try {
    if (page === "jobs") await jobsPage();
    if (page === "job") await jobPage(document.body.dataset.job);
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.ready = "true";
  } catch (error) {
    document.getElementById("updated").textContent = `not updated: ${error.message}`;
  }
}

if (document.body.dataset.page !== "login") {
  refresh();
  setInterval(refresh, 3000);
}
