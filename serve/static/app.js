// The cxr-retrieval viewer: plain JS over the server's JSON API (no build step, no framework).
// Every text from the server goes in through textContent, never innerHTML.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { file: null, token: sessionStorage.getItem("cxr-token") || null, archiveUrl: null };

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

// fetch with the bearer token (asked for once when the server answers 401)
async function api(path, opts = {}, retry = true) {
  const headers = new Headers(opts.headers || {});
  if (state.token) headers.set("Authorization", "Bearer " + state.token);
  const r = await fetch(path, { ...opts, headers });
  if (r.status === 401 && retry) {
    const t = window.prompt("This server needs its access token (cxr serve --token):");
    if (t) {
      state.token = t.trim();
      sessionStorage.setItem("cxr-token", state.token);
      return api(path, opts, false);
    }
  }
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new Error(`${r.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  return r;
}

async function thumb(img, studyId, imageId, size = 256) {
  const q = new URLSearchParams({ size: String(size) });
  if (imageId) q.set("image_id", imageId);
  try {
    const r = await api(`/studies/${encodeURIComponent(studyId)}/image?${q}`);
    img.src = URL.createObjectURL(await r.blob());
  } catch (e) {
    img.alt = "image unavailable";
    img.classList.add("missing");
  }
}

function status(msg, error = false) {
  const s = $("#status");
  s.textContent = msg;
  s.classList.toggle("error", error);
}

function labelsEl(labels) {
  const d = el("div", { class: "labels" });
  for (const l of labels || []) d.append(el("span", { class: "label" + (l === "No Finding" ? " normal" : ""), text: l }));
  return d;
}

// The archive viewer's URL for a study (`cxr serve --archive-url TEMPLATE`): every {field} of the template filled
// with the study's URL-encoded value; null without a template or when a named field is empty (non-DICOM rows).
// serve/archive_link.py `archive_link` is the same rule in Python.
function archiveLink(row) {
  if (!state.archiveUrl) return null;
  let missing = false;
  const url = state.archiveUrl.replace(/\{([a-z_]+)\}/g, (_, name) => {
    const v = row[name];
    if (v === undefined || v === null || String(v) === "") missing = true;
    return encodeURIComponent(String(v ?? ""));
  });
  return missing ? null : url;
}

function archiveAnchor(row) {
  const href = archiveLink(row);
  if (!href) return "";
  const a = el("a", { class: "archive", href, target: "_blank", rel: "noopener noreferrer", text: "open in archive" });
  a.addEventListener("click", (ev) => ev.stopPropagation());
  return a;
}

function params() {
  return { k: $("#k").value || "8", target: $("#target").value, exclude_patient: $("#exclude").value.trim() };
}

// ---------------------------------------------------------------- search

async function searchImage(file) {
  const p = params();
  const fd = new FormData();
  fd.append("image", file, file.name);
  for (const [k, v] of Object.entries(p)) if (v) fd.append(k, v);
  await runSearch(() => api("/search", { method: "POST", body: fd }), `${p.target} like ${file.name}`);
}

async function searchText(text) {
  const p = params();
  const body = { text, k: Number(p.k), target: p.target };
  if (p.exclude_patient) body.exclude_patient = p.exclude_patient;
  await runSearch(
    () => api("/search", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) }),
    `${p.target} like “${text}”`,
  );
}

async function runSearch(call, title) {
  status("searching…");
  $("#grid").replaceChildren();
  const t0 = performance.now();
  try {
    const doc = await (await call()).json();
    const ms = Math.round(performance.now() - t0);
    status(`${doc.results.length} ${title} · ${ms} ms`);
    renderGrid(doc);
  } catch (e) {
    status(String(e.message || e), true);
  }
}

function renderGrid(doc) {
  const grid = $("#grid");
  grid.replaceChildren();
  for (const r of doc.results) {
    const img = el("img", { class: "thumb", alt: `study ${r.study_id}` });
    const card = el(
      "article",
      { class: "card", tabindex: "0", "data-study": r.study_id, title: "open the study", onclick: () => openStudy(r.study_id, doc.target === "images" ? r.image_id : null) },
      img,
      el("div", { class: "card-head" },
        el("span", { class: "rank", text: `#${r.rank}` }),
        el("span", { class: "score", text: r.score.toFixed(3) }),
        el("span", { class: "sid muted", text: r.study_id }),
        archiveAnchor(r)),
      labelsEl(r.labels),
      el("p", { class: "report", text: r.report || "(no report)" }),
    );
    card.addEventListener("keydown", (ev) => { if (ev.key === "Enter") card.click(); });
    grid.append(card);
    thumb(img, r.study_id, doc.target === "images" ? r.image_id : null);
  }
}

// ---------------------------------------------------------------- the study dialog

async function openStudy(studyId, imageId) {
  const dlg = $("#study");
  $("#study-title").textContent = `study ${studyId}`;
  $("#study-report").textContent = "loading…";
  $("#study-labels").replaceChildren();
  $("#study-meta").textContent = "";
  $("#study-archive").replaceChildren();
  $("#study-img").removeAttribute("src");
  if (!dlg.open) dlg.showModal();
  try {
    const s = await (await api(`/studies/${encodeURIComponent(studyId)}`)).json();
    $("#study-report").textContent = s.report || "(no report)";
    $("#study-labels").replaceWith(Object.assign(labelsEl(s.labels), { id: "study-labels" }));
    $("#study-meta").textContent = `patient ${s.patient_id} · split ${s.split} · ${s.images.length} image(s): ` +
      s.images.map((i) => `${i.image_id} (${i.view})`).join(", ");
    $("#study-archive").replaceChildren(archiveAnchor(s));
    thumb($("#study-img"), studyId, imageId, 512);
  } catch (e) {
    $("#study-report").textContent = String(e.message || e);
  }
}

// ---------------------------------------------------------------- generation

async function generate(task, extra = {}) {
  if (!state.file) return null;
  const fd = new FormData();
  fd.append("image", state.file, state.file.name);
  fd.append("task", task);
  for (const [k, v] of Object.entries(extra)) fd.append(k, v);
  const ex = $("#exclude").value.trim();
  if (ex) fd.append("exclude_patient", ex);
  return (await api("/generate", { method: "POST", body: fd })).json();
}

function busy(button, on) {
  button.disabled = on;
  button.classList.toggle("busy", on);
}

async function draft() {
  const b = $("#draft");
  busy(b, true);
  $("#draft-out").hidden = false;
  $("#draft-text").textContent = "drafting…";
  $("#exemplars").replaceChildren();
  try {
    const res = await generate("report", { k: "3" });
    const p = $("#draft-text");
    p.replaceChildren();
    for (const s of res.sentences) {
      const node = s.exemplars.length
        ? el("mark", { title: "also in exemplar " + s.exemplars.join(", "), text: s.text })
        : document.createTextNode(s.text);
      p.append(node, " ");
    }
    if (!res.sentences.length) p.textContent = res.text || "(empty)";
    const list = $("#exemplars");
    if (!res.exemplars.length) list.append(el("li", { class: "muted", text: "no exemplars (retrieval off)" }));
    for (const e of res.exemplars) {
      const a = el("a", { class: "exemplar", href: `#study/${encodeURIComponent(e.study_id)}`, text: e.study_id });
      a.addEventListener("click", (ev) => { ev.preventDefault(); openStudy(e.study_id); });
      const matched = new Set(e.matched);  // the report's sentences that say a sentence of the draft
      const rep = el("p", { class: "report" });
      for (const s of e.report.match(/[^.!?\n]+[.!?]?/g) || []) {
        const t = s.trim();
        rep.append(matched.has(t) ? el("mark", { text: t }) : document.createTextNode(t), " ");
      }
      list.append(el("li", {}, a, el("span", { class: "score", text: ` ${e.score.toFixed(3)}` }),
        el("span", { class: "muted small", text: ` · ${e.shared.length} shared sentence(s)` }), labelsEl(e.labels), rep));
    }
  } catch (e) {
    $("#draft-text").textContent = String(e.message || e);
  } finally {
    busy(b, false);
  }
}

function drawBoxes(boxes, task) {
  const ov = $("#overlay");
  for (const b of boxes) {
    const d = el("div", { class: `box ${task}`, "data-task": task, "data-label": b.label || "" });
    d.style.left = `${100 * b.x1}%`;
    d.style.top = `${100 * b.y1}%`;
    d.style.width = `${100 * Math.max(0, b.x2 - b.x1)}%`;
    d.style.height = `${100 * Math.max(0, b.y2 - b.y1)}%`;
    d.append(el("span", { class: "box-label", text: b.label || task }));
    ov.append(d);
  }
}

async function boxesTask(button, task, extra, describe) {
  busy(button, true);
  const out = $(task === "vqa" ? "#vqa-answer" : "#box-answer");
  out.textContent = `${task}…`;
  try {
    const res = await generate(task, extra);
    drawBoxes(res.boxes || [], task);
    out.replaceChildren(el("strong", { text: `[${task}] ` }), document.createTextNode(describe(res)));
  } catch (e) {
    out.textContent = String(e.message || e);
  } finally {
    busy(button, false);
  }
}

// ---------------------------------------------------------------- wiring

function setFile(file) {
  state.file = file;
  $("#overlay").replaceChildren();
  $("#box-answer").textContent = "";
  $("#vqa-answer").textContent = "";
  $("#draft-out").hidden = true;
  $("#query-view").hidden = false;
  $("#tools").hidden = false;
  $("#query-name").textContent = file.name;
  const img = $("#query-img");
  const shown = /\.(png|jpe?g)$/i.test(file.name) || /^image\/(png|jpeg)$/.test(file.type);
  if (shown) {
    img.src = URL.createObjectURL(file);
    img.hidden = false;
  } else {
    img.hidden = true;
    $("#query-name").textContent = `${file.name} (DICOM: no preview in the browser; boxes are listed as text)`;
  }
  searchImage(file);
}

async function showInfo() {
  try {
    const i = await (await api("/info")).json();
    $("#info").textContent = `model ${i.model.name} · ${i.index.count.toLocaleString()} images, ` +
      `${i.index.studies.toLocaleString()} studies (${i.index.factory}) · VLM ${i.vlm.loaded ? "loaded" : "none"}`;
    for (const id of ["draft", "identify"]) $("#" + id).disabled = !i.vlm.loaded;
    state.archiveUrl = i.archive_url || null;
  } catch (e) {
    $("#info").textContent = String(e.message || e);
  }
}

function init() {
  const drop = $("#drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    if (ev.dataTransfer.files.length) setFile(ev.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (ev) => { if (ev.key === "Enter") $("#file").click(); });
  $("#file").addEventListener("change", (ev) => { if (ev.target.files.length) setFile(ev.target.files[0]); });
  $("#text-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("#text").value.trim();
    if (t) searchText(t);
  });
  $("#draft").addEventListener("click", draft);
  $("#identify").addEventListener("click", () => boxesTask($("#identify"), "identify", {},
    (r) => r.boxes.length ? r.boxes.map((b) => b.label).join(", ") : (r.text || "no findings")));
  $("#clear-boxes").addEventListener("click", () => $("#overlay").replaceChildren());
  $("#ground-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const phrase = $("#phrase").value.trim();
    if (phrase) boxesTask($("#ground-form button"), "ground", { phrase },
      (r) => r.boxes.length ? `${phrase}: box drawn` : `no box for ${phrase} (${r.text})`);
  });
  $("#vqa-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const question = $("#question").value.trim();
    if (question) boxesTask($("#vqa-form button"), "vqa", { question }, (r) => r.text || "(no answer)");
  });
  window.addEventListener("hashchange", routeHash);
  routeHash();
  showInfo();
}

function routeHash() {
  const m = location.hash.match(/^#study\/(.+)$/);
  if (m) openStudy(decodeURIComponent(m[1]));
}

init();
