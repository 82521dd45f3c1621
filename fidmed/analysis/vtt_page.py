"""The rater's page of a visual Turing test: one self-contained HTML file (no network, no external files).

Images are embedded as ``data:`` URIs; a Content-Security-Policy forbids every external request. Keys:
R = real, G (or F) = generated, the Likert digits, Enter / right arrow = next, Backspace / left arrow = back,
D = download the answers as CSV, H (or ?) = help. The next image comes once both the answer and the rating of an
image are given. The page fits one screen: the image takes the height that the header, the help (while shown) and
the controls leave, so the answer and rating buttons are always visible without scrolling. Answers are kept in the
browser's localStorage (per test and rater) so that a reload loses nothing; the CSV (columns
``fidmed.analysis.vtt.PAGE_COLUMNS``) lists every image, answered or not.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from typing import Any

_TEMPLATE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>__TITLE__</title>
<style>
  /* One screen, no scrolling: a column as tall as the window; the image box takes the height that the header,
     the help (while shown) and the controls leave, and the image fits it (object-fit: contain). */
  html, body { height: 100%; }
  body { font-family: system-ui, sans-serif; margin: 0; background: #111; color: #eee; display: flex;
         flex-direction: column; height: 100vh; height: 100dvh; box-sizing: border-box; }
  header, main { width: 100%; max-width: 980px; margin: 0 auto; padding: 6px 16px; box-sizing: border-box; }
  header { flex: none; display: flex; justify-content: space-between; align-items: baseline; flex-wrap: wrap;
           gap: 8px; }
  main { flex: 1 1 auto; min-height: 0; display: flex; flex-direction: column; padding-top: 0; }
  main > * { flex: none; }
  h1 { font-size: 1.1rem; margin: 0; }
  #progress-outer { height: 8px; background: #333; border-radius: 4px; overflow: hidden; margin: 0 0 6px; }
  #progress-bar { height: 100%; width: 0; background: #4caf50; }
  #stage { flex: 1 1 0; min-height: 96px; position: relative; background: #000; }
  #image { position: absolute; inset: 0; width: 100%; height: 100%; object-fit: contain; }
  .row { display: flex; gap: 8px; justify-content: center; flex-wrap: wrap; margin: 6px 0 0; }
  button { font-size: 1rem; padding: 7px 14px; border-radius: 6px; border: 1px solid #666; background: #222;
           color: #eee; cursor: pointer; }
  button[aria-pressed="true"] { background: #1e88e5; border-color: #90caf9; }
  button:focus-visible { outline: 2px solid #ffeb3b; }
  kbd { border: 1px solid #888; border-radius: 3px; padding: 0 4px; font-size: .85em; }
  #help { background: #222; border: 1px solid #555; padding: 4px 12px; border-radius: 6px; margin-bottom: 6px;
          font-size: .9rem; position: relative; }
  #help p { margin: 4px 0; }
  #btn-help-hide { float: right; font-size: .85rem; padding: 2px 8px; margin: 2px 0 2px 8px; }
  #done { background: #1b5e20; padding: 6px 16px; border-radius: 6px; margin-top: 6px; }
  .muted { color: #aaa; }
</style>
</head>
<body>
<header>
  <h1>__TITLE__ &mdash; <span id="rater"></span></h1>
  <div><span id="part"></span> &middot; <span id="counter"></span> &middot; <span id="answered"></span></div>
</header>
<main>
  <div id="progress-outer" role="progressbar" aria-valuemin="0" aria-valuemax="100" aria-valuenow="0">
    <div id="progress-bar"></div></div>
  <div id="help">
    <button id="btn-help-hide">Hide help <kbd>H</kbd></button>
    <p>For each image, say whether it is a <b>real</b> image or one <b>generated</b> by a computer, then rate how
       realistic it looks from <b id="low"></b> (surely generated) to <b id="high"></b> (surely real).
       The next image appears once both are given; you can go back at any time.</p>
    <p>Keys: <kbd>R</kbd> real, <kbd>G</kbd> generated, <kbd id="keys"></kbd> rating, <kbd>Enter</kbd>/<kbd>&rarr;</kbd>
       next, <kbd>Backspace</kbd>/<kbd>&larr;</kbd> back, <kbd>D</kbd> download answers, <kbd>H</kbd> show/hide
       this help.</p>
    <p class="muted">Your answers stay in this browser until you download them. When you are done, press
       <kbd>D</kbd> and send the downloaded CSV file to the organiser.</p>
  </div>
  <div id="stage"><img id="image" alt=""></div>
  <div class="row" id="answers">
    <button id="btn-real" data-answer="real">Real <kbd>R</kbd></button>
    <button id="btn-generated" data-answer="generated">Generated <kbd>G</kbd></button>
  </div>
  <div class="row" id="likert"></div>
  <div class="row">
    <button id="btn-prev">&larr; Back</button>
    <button id="btn-next">Next &rarr;</button>
    <button id="btn-download">Download answers (CSV) <kbd>D</kbd></button>
    <button id="btn-help">Help <kbd>H</kbd></button>
  </div>
  <div id="done" hidden>All images are answered. Press <kbd>D</kbd> to download your answers and send the file to
    the organiser.</div>
</main>
<script>
"use strict";
const DATA = __DATA__;
const COLUMNS = ["test_id", "key_sha256", "rater", "position", "image_id", "answer", "rating", "answered_at"];
const items = DATA.items;
const N = items.length;
const storeKey = "fidmed-vtt:" + DATA.test_id + ":" + DATA.rater;
const state = { index: 0, answers: {} };
const $ = (id) => document.getElementById(id);

function load() {
  try {
    const saved = JSON.parse(window.localStorage.getItem(storeKey) || "null");
    if (saved && typeof saved === "object" && saved.answers) {
      state.answers = saved.answers;
      state.index = Math.min(Math.max(0, saved.index | 0), N - 1);
    }
  } catch (e) { /* no storage (private mode): answers live until the page closes */ }
}
function save() {
  try { window.localStorage.setItem(storeKey, JSON.stringify(state)); } catch (e) { /* ignore */ }
}
function entry(id) { return state.answers[id] || (state.answers[id] = { answer: "", rating: null, at: "" }); }
function complete(id) { const a = state.answers[id]; return !!(a && a.answer && a.rating !== null); }
function nAnswered() { return items.filter((it) => complete(it.id)).length; }

function render() {
  const it = items[state.index];
  const a = state.answers[it.id] || { answer: "", rating: null };
  $("image").src = it.src;
  $("image").alt = "image " + (state.index + 1) + " of " + N;
  $("part").textContent = "Part " + it.part + " of " + DATA.n_parts;
  $("counter").textContent = "Image " + (state.index + 1) + " of " + N;
  const done = nAnswered();
  $("answered").textContent = done + " of " + N + " answered";
  const pct = Math.round(100 * done / N);
  $("progress-bar").style.width = pct + "%";
  $("progress-outer").setAttribute("aria-valuenow", String(pct));
  for (const b of document.querySelectorAll("#answers button")) {
    b.setAttribute("aria-pressed", String(b.dataset.answer === a.answer));
  }
  for (const b of document.querySelectorAll("#likert button")) {
    b.setAttribute("aria-pressed", String(Number(b.dataset.rating) === a.rating));
  }
  $("done").hidden = done !== N;
  document.body.dataset.index = String(state.index);
  document.body.dataset.answered = String(done);
}
function update(change) {
  const id = items[state.index].id;
  const before = complete(id);
  const a = entry(id);
  Object.assign(a, change, { at: new Date().toISOString() });
  if (!before && complete(id) && state.index < N - 1) state.index += 1;
  save();
  render();
}
function go(step) {
  state.index = Math.min(Math.max(0, state.index + step), N - 1);
  save();
  render();
}
function csvField(v) {
  const s = v === null || v === undefined ? "" : String(v);
  return /[",\r\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
}
function buildCSV() {
  const lines = [COLUMNS.join(",")];
  items.forEach((it, i) => {
    const a = state.answers[it.id] || { answer: "", rating: null, at: "" };
    lines.push([DATA.test_id, DATA.key_sha256, DATA.rater, i + 1, it.id, a.answer, a.rating, a.at]
      .map(csvField).join(","));
  });
  return lines.join("\r\n") + "\r\n";
}
function download() {
  const blob = new Blob([buildCSV()], { type: "text/csv;charset=utf-8" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "vtt-answers-" + DATA.test_id + "-" + DATA.rater + ".csv";
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60000);
}
function toggleHelp() {
  $("help").hidden = !$("help").hidden;
  $("btn-help").setAttribute("aria-pressed", String(!$("help").hidden));
}
function build() {
  $("rater").textContent = DATA.rater;
  $("low").textContent = String(DATA.likert.low);
  $("high").textContent = String(DATA.likert.high);
  $("keys").textContent = DATA.likert.low + "\u2013" + DATA.likert.high;
  const box = $("likert");
  for (let r = DATA.likert.low; r <= DATA.likert.high; r++) {
    const b = document.createElement("button");
    b.dataset.rating = String(r);
    const label = DATA.likert.labels.length ? " " + DATA.likert.labels[r - DATA.likert.low] : "";
    b.textContent = r + label;
    b.addEventListener("click", () => update({ rating: r }));
    box.appendChild(b);
  }
  $("btn-real").addEventListener("click", () => update({ answer: "real" }));
  $("btn-generated").addEventListener("click", () => update({ answer: "generated" }));
  $("btn-prev").addEventListener("click", () => go(-1));
  $("btn-next").addEventListener("click", () => go(1));
  $("btn-download").addEventListener("click", download);
  $("btn-help").setAttribute("aria-pressed", "true");
  $("btn-help").addEventListener("click", toggleHelp);
  $("btn-help-hide").addEventListener("click", toggleHelp);
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const k = e.key;
    let handled = true;
    if (k === "r" || k === "R") update({ answer: "real" });
    else if (k === "g" || k === "G" || k === "f" || k === "F") update({ answer: "generated" });
    else if (/^[0-9]$/.test(k) && Number(k) >= DATA.likert.low && Number(k) <= DATA.likert.high)
      update({ rating: Number(k) });
    else if (k === "Enter" || k === "ArrowRight") go(1);
    else if (k === "Backspace" || k === "ArrowLeft") go(-1);
    else if (k === "d" || k === "D") download();
    else if (k === "h" || k === "H" || k === "?") toggleHelp();
    else handled = false;
    if (handled) e.preventDefault();
  });
}
window.fidmedVTT = { state, items, buildCSV, nAnswered };
build();
load();
render();
document.body.dataset.ready = "1";
</script>
</body>
</html>
"""


def render_page(payload: Mapping[str, Any]) -> str:
    """The HTML page for one rater. ``payload``: test_id, key_sha256, rater, title, likert{low, high, labels},
    n_parts and items [{id, part, src}] in presentation order (it must hold nothing that reveals the truth)."""
    data = json.dumps(payload, ensure_ascii=True, separators=(",", ":")).replace("</", "<\\/")
    return _TEMPLATE.replace("__TITLE__", html.escape(str(payload.get("title", "Visual Turing test")))).replace(
        "__DATA__", data
    )
