// The kosmos2 serve page: pick or drop an image, choose a task, see the boxes and the coloured text.
// Plain JavaScript, no build step, nothing fetched but this server's own API.
"use strict";

// The terminal's palette (kosmos2_cli/cli/palette.py COLORS): entity i takes colour i, cycling.
const COLORS = ["#3b82f6", "#f97316", "#22c55e", "#ef4444", "#a855f7", "#06b6d4", "#eab308", "#ec4899", "#84cc16",
                "#14b8a6"];
const REGION_COLOR = "#ffffff";
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
let file = null;
let size = null; // the picture as seen: [width, height]
let drag = null;

function task() { return document.querySelector("input[name=task]:checked").value; }

function showArgs() {
  for (const el of document.querySelectorAll(".arg")) el.hidden = el.dataset.task !== task();
  $("overlay").classList.toggle("drawing", task() === "refer");
}

function status(message, error = false) {
  $("status").textContent = message;
  $("status").className = error ? "error" : "dim";
}

function pick(chosen) {
  if (!chosen) return;
  file = chosen;
  const url = URL.createObjectURL(chosen);
  const img = $("picture");
  img.onload = () => {
    size = [img.naturalWidth, img.naturalHeight];
    clear();
    $("overlay").setAttribute("viewBox", `0 0 ${size[0]} ${size[1]}`);
    $("run").disabled = false;
    status(`${chosen.name}: ${size[0]} × ${size[1]}`);
  };
  img.src = url;
}

function clear() {
  $("overlay").replaceChildren();
  $("text").replaceChildren();
  $("entities").replaceChildren();
  $("json").textContent = "";
}

function node(tag, attrs = {}, text = null) {
  const el = tag === "span" || tag === "td" || tag === "th" || tag === "tr" ? document.createElement(tag)
    : document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, value);
  if (text !== null) el.textContent = text;
  return el;
}

function rect(box, color, attrs = {}) {
  const [x1, y1, x2, y2] = box;
  const line = Math.max(2, Math.round(Math.max(size[0], size[1]) / 250));
  return node("rect", { x: x1, y: y1, width: x2 - x1, height: y2 - y1, fill: "none", stroke: color,
                        "stroke-width": line, ...attrs });
}

function draw(record) {
  const svg = $("overlay");
  svg.replaceChildren();
  const font = Math.max(12, Math.round(Math.max(size[0], size[1]) / 40));
  if (record.box_px) svg.append(rect(record.box_px, REGION_COLOR, { "stroke-dasharray": `${font / 2} ${font / 3}`,
                                                                   class: "region" }));
  record.entities.forEach((entity, i) => {
    const color = COLORS[i % COLORS.length];
    for (const box of entity.boxes_px) {
      const group = node("g", { class: "entity", "data-phrase": entity.phrase, "data-box": box.join(",") });
      group.append(rect(box, color));
      const label = node("text", { x: box[0] + 2, y: Math.max(font, box[1] - 4), fill: color, "font-size": font,
                                   "font-family": "system-ui, sans-serif", "font-weight": "bold",
                                   stroke: "#000", "stroke-width": font / 12, "paint-order": "stroke" },
                         entity.phrase);
      group.append(label);
      svg.append(group);
    }
  });
}

function colouredText(record) {
  const out = $("text");
  out.replaceChildren();
  const text = record.text || "";
  const spans = record.entities.map((e, i) => [e.span[0], e.span[1], i]).sort((a, b) => a[0] - b[0]);
  let at = 0;
  if (record.task === "ask") out.append(node("span", { class: "dim" }, `Q: ${record.question}  A: `));
  for (const [start, end, i] of spans) {
    if (start < at || end > text.length) continue;
    out.append(document.createTextNode(text.slice(at, start)));
    out.append(node("span", { class: "phrase", style: `color: ${COLORS[i % COLORS.length]}` },
                    text.slice(start, end)));
    at = end;
  }
  out.append(document.createTextNode(text.slice(at)));
}

function table(record) {
  const t = $("entities");
  t.replaceChildren();
  const head = node("tr");
  for (const name of ["", "phrase", "x1", "y1", "x2", "y2", "score"]) head.append(node("th", {}, name));
  t.append(head);
  record.entities.forEach((entity, i) => {
    const color = COLORS[i % COLORS.length];
    entity.boxes_px.forEach((box, n) => {
      const row = node("tr");
      row.append(node("td", { style: `color: ${color}` }, n ? "" : "■"));
      row.append(node("td", { style: `color: ${color}; font-weight: bold` }, n ? "" : entity.phrase));
      for (const v of box) row.append(node("td", {}, String(v)));
      const score = entity.scores ? entity.scores[n] : null;
      row.append(node("td", {}, score == null ? "" : score.toFixed(2)));
      t.append(row);
    });
  });
  for (const [phrase, placed] of Object.entries(record.found || {})) {
    if (placed) continue;
    const row = node("tr", { class: "dim" });
    row.append(node("td", {}, "·"), node("td", {}, phrase), node("td", { colspan: 5 }, "not found"));
    t.append(row);
  }
}

async function run() {
  if (!file) return;
  const form = new FormData();
  form.append("image", file, file.name);
  const name = task();
  if (name === "caption" && $("detailed").checked) form.append("detailed", "true");
  if (name === "ground") for (const p of $("phrases").value.split("\n")) if (p.trim()) form.append("phrase", p);
  if (name === "refer") form.append("box", $("box").value);
  if (name === "ask") form.append("question", $("question").value);
  if ($("max_new_tokens").value) form.append("max_new_tokens", $("max_new_tokens").value);
  if ($("sample").checked) {
    form.append("sample", "true");
    form.append("temperature", $("temperature").value);
  }
  const headers = {};
  const token = $("token").value.trim();
  if (token) { headers.Authorization = `Bearer ${token}`; localStorage.setItem("kosmos2-token", token); }
  $("run").disabled = true;
  status("running…");
  const start = performance.now();
  try {
    const response = await fetch(`/v1/${name}`, { method: "POST", body: form, headers });
    const record = await response.json();
    if (!response.ok) { status(record.error || `HTTP ${response.status}`, true); return; }
    draw(record);
    colouredText(record);
    table(record);
    $("json").textContent = JSON.stringify(record, null, 1);
    document.body.dataset.done = String(Date.now());
    status(`${record.image}  ${record.width}×${record.height}  ${record.task}  ` +
           `${((performance.now() - start) / 1000).toFixed(2)} s`);
  } catch (err) {
    status(String(err), true);
  } finally {
    $("run").disabled = false;
  }
}

function point(event) {
  const box = $("overlay").getBoundingClientRect();
  const x = Math.round(((event.clientX - box.left) / box.width) * size[0]);
  const y = Math.round(((event.clientY - box.top) / box.height) * size[1]);
  return [Math.min(Math.max(x, 0), size[0]), Math.min(Math.max(y, 0), size[1])];
}

function info() {
  const token = $("token").value.trim();
  fetch("/v1/info", { headers: token ? { Authorization: `Bearer ${token}` } : {} })
    .then((r) => (r.ok ? r.json() : null))
    .then((i) => {
      if (!i) return;
      $("info").textContent = `${i.model} · ${i.device} · ${i.dtype} · v${i.version}`;
      $("info").title = $("info").textContent;
      $("max_new_tokens").max = i.max_new_tokens;
      $("max_new_tokens").placeholder = `${i.max_new_tokens} (the server's)`;
    })
    .catch(() => {});
}

function setUp() {
  for (const radio of document.querySelectorAll("input[name=task]")) radio.addEventListener("change", showArgs);
  showArgs();
  $("file").addEventListener("change", (e) => pick(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); pick(e.dataTransfer.files[0]); });
  $("run").addEventListener("click", run);
  $("token").value = localStorage.getItem("kosmos2-token") || "";
  const svg = $("overlay");
  svg.addEventListener("pointerdown", (e) => {
    if (task() !== "refer" || !size) return;
    drag = point(e);
    svg.setPointerCapture(e.pointerId);
  });
  svg.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const [x, y] = point(e);
    const box = [Math.min(drag[0], x), Math.min(drag[1], y), Math.max(drag[0], x), Math.max(drag[1], y)];
    svg.replaceChildren(rect(box, REGION_COLOR, { "stroke-dasharray": "8 5", class: "region" }));
    $("box").value = box.join(",");
  });
  svg.addEventListener("pointerup", () => { drag = null; });
  $("token").addEventListener("change", info);
  info();
}

setUp();
