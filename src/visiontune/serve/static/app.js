// The visiontune page: talks to its own server only (/v1/...), and puts every string that comes from the
// model or the server into the page as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, explain: false, overlayUrl: null, previewUrl: null, busy: 0 };
const METRIC_NAMES = {
  top1: "top-1", top3: "top-3", top5: "top-5", macro_f1: "macro F1", balanced_accuracy: "balanced acc.",
  ece: "ECE", val_top1: "val top-1", test_top1: "test top-1",
};

function apiKey() {
  return sessionStorage.getItem("visiontune-key") || "";
}

function headers() {
  const key = apiKey();
  return key ? { "X-API-Key": key } : {};
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function percent(p) {
  return (100 * p).toFixed(p >= 0.1 ? 1 : 2) + " %";
}

// A failed call as one readable sentence: the server's own message when it sent one.
async function failure(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `the server answered ${response.status} ${response.statusText}`;
}

async function call(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (response.status === 401) $("key-form").hidden = false;
  return response;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(text) {
  $("status").textContent = text;
}

async function loadModel() {
  let response;
  try {
    response = await call("/v1/model");
  } catch (err) {
    $("model-name").textContent = "the server cannot be reached";
    return;
  }
  if (!response.ok) {
    $("model-name").textContent = await failure(response);
    return;
  }
  const info = await response.json();
  $("model-name").textContent = `${info.backbone} · ${info.labels.length} classes · ${info.engine}`;
  state.explain = info.explain;
  $("gradcam").disabled = !info.explain;
  $("gradcam-note").textContent = info.explain ? "" : "needs the run directory (PyTorch weights), not an exported file";

  const labels = $("labels");
  labels.replaceChildren(...info.labels.map((name) => el("li", name)));

  const metrics = $("metrics");
  const rows = [];
  for (const [key, name] of Object.entries(METRIC_NAMES)) {
    const value = info.metrics[key];
    if (typeof value !== "number" || (key === "test_top1" && typeof info.metrics.top1 === "number")) continue;
    const box = el("div");
    const label = key === "top1" && info.metrics.split ? `${info.metrics.split} top-1` : name;
    const ci = (info.metrics.intervals || {})[key];  // the 95 % interval, where the evaluation recorded one
    const shown = key === "ece" ? value.toFixed(3) : percent(value);
    box.append(el("dt", label), el("dd", ci ? `${shown} (95 %: ${percent(ci[0])}–${percent(ci[1])})` : shown));
    rows.push(box);
  }
  if (info.metrics.split && info.metrics.images) {
    const box = el("div");
    box.append(el("dt", "scored on"), el("dd", `${info.metrics.images} ${info.metrics.split} images`));
    rows.push(box);
  }
  if (!rows.length) rows.push(el("p", "no metrics recorded for this model", "muted"));
  metrics.replaceChildren(...rows);
  const v = info.versions;
  $("versions").textContent = `visiontune ${v.visiontune}, onnxruntime ${v.onnxruntime}` +
    (v.trained_with && v.trained_with.torch ? `; trained with torch ${v.trained_with.torch}, timm ${v.trained_with.timm}` : "");
}

function form(file) {
  const data = new FormData();
  data.append("file", file, file.name);
  return data;
}

function showResult(result) {
  const list = $("results");
  list.replaceChildren(...result.top_k.map((entry) => {
    const row = el("li");
    const bar = el("div", undefined, "bar");
    const fill = el("span");
    fill.style.width = `${Math.max(0.5, 100 * entry.probability)}%`;
    bar.append(fill);
    row.append(el("span", entry.label, "name"), bar, el("span", percent(entry.probability), "pct"));
    row.title = entry.label;
    return row;
  }));
  const summary = $("summary");
  if (result.labels) {
    // A multi-label model: the set of labels above their thresholds ("none" when no label passes).
    const names = result.labels.map((entry) => `${entry.label} ${percent(entry.probability)}`);
    summary.replaceChildren(el("span", names.length ? `labels: ${names.join(", ")}` : "labels: none", "badge"));
    return;
  }
  summary.replaceChildren(document.createTextNode(`entropy ${result.entropy.toFixed(3)} nats `));
  if (result.unknown) {
    // Far from every class the model was trained on: the bars show only the nearest classes.
    const badge = el("span", "unknown: not one of this model's classes", "badge unknown");
    badge.title = `unknown score ${result.unknown_score.toFixed(2)}, above the model's threshold`;
    summary.append(badge);
  } else if (result.uncertain) summary.append(el("span", "uncertain", "badge"));
}

async function classify(file) {
  const ticket = ++state.busy;
  state.file = file;
  showError("");
  $("results").replaceChildren();
  $("summary").textContent = "";
  setStatus(`Classifying ${file.name}…`);
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  if (state.overlayUrl) URL.revokeObjectURL(state.overlayUrl);
  state.previewUrl = URL.createObjectURL(file);
  state.overlayUrl = null;
  const preview = $("preview");
  preview.src = state.previewUrl;
  preview.alt = file.name;
  $("drop-text").hidden = true;
  showLayer();
  let response;
  try {
    response = await call("/v1/predict?top_k=5", { method: "POST", body: form(file) });
  } catch (err) {
    if (ticket === state.busy) { setStatus(""); showError("The server cannot be reached."); }
    return;
  }
  if (ticket !== state.busy) return; // a newer image was chosen meanwhile
  if (!response.ok) {
    setStatus("");
    preview.hidden = true;
    $("drop-text").hidden = false;
    const message = await failure(response);  // the server's message names the file when it is about it
    showError(`Could not classify ${file.name}: ${message.startsWith(file.name + ": ") ? message.slice(file.name.length + 2) : message}`);
    state.file = null;
    return;
  }
  const result = await response.json();
  setStatus("");
  showResult(result);
  if ($("gradcam").checked) await showOverlay();
}

async function showOverlay() {
  if (!state.file || !state.explain) return;
  if (!state.overlayUrl) {
    const file = state.file;
    $("gradcam-note").textContent = "computing Grad-CAM…";
    const response = await call("/v1/explain", { method: "POST", body: form(file) });
    if (file !== state.file) return;
    $("gradcam-note").textContent = "";
    if (!response.ok) {
      showError(`Grad-CAM failed: ${await failure(response)}`);
      return;
    }
    state.overlayUrl = URL.createObjectURL(await response.blob());
    $("overlay").src = state.overlayUrl;
  }
  showLayer();
}

function showLayer() {
  const overlayOn = $("gradcam").checked && !!state.overlayUrl;
  $("overlay").hidden = !overlayOn;
  $("preview").hidden = overlayOn || !state.previewUrl;
}

function pick(files) {
  if (files && files.length) classify(files[0]);
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => pick(e.target.files));
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => pick(e.dataTransfer.files));
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
  });
  $("gradcam").addEventListener("change", () => ($("gradcam").checked ? showOverlay() : showLayer()));
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("visiontune-key", $("key").value);
    $("key-form").hidden = true;
    loadModel();
  });
}

wire();
loadModel();
