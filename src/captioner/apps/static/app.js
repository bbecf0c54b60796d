// The captioner page: get a photo (file, drop, paste, camera), ask /api/caption, show and speak the
// caption, and draw each word's attention map over the photo when the word is hovered or focused.
"use strict";

const $ = (id) => document.getElementById(id);
const SPEAK_KEY = "captioner.speak";
let result = null;        // the last /api/caption answer
let cameraStream = null;  // the live getUserMedia stream, so it can be stopped

// ---- talking to the server ----------------------------------------------------------------

async function captionPhoto(blob, name) {
  showError("");
  showPhoto(blob, name);
  const beam = Math.min(10, Math.max(1, parseInt($("beam").value, 10) || 3));
  const params = new URLSearchParams({ beam, n_best: Math.min(3, beam), attention: "true" });
  const form = new FormData();
  form.append("file", blob, name || "photo.jpg");
  setBusy(true);
  try {
    const response = await fetch(`/api/caption?${params}`, { method: "POST", body: form });
    const body = await response.json().catch(() => ({ detail: `server answered ${response.status}` }));
    if (!response.ok) throw new Error(body.detail || `server answered ${response.status}`);
    showResult(body);
  } catch (e) {
    showError(`Could not caption ${name || "the photo"}: ${e.message}`);
    clearResult();
  } finally {
    setBusy(false);
  }
}

function setBusy(busy) {
  $("result").setAttribute("aria-busy", String(busy));
  $("status").textContent = busy ? "Writing a caption…" : "";
}

function showError(message) {
  $("error").textContent = message;
}

// ---- showing the photo and the caption -------------------------------------------------------

function showPhoto(blob, name) {
  const img = $("photo");
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(blob);
  img.alt = `Your photo${name ? " " + name : ""}`;
  $("stage").hidden = false;
  clearOverlay();
}

function clearResult() {
  result = null;
  $("caption").replaceChildren();
  $("score").textContent = "";
  $("alternatives").replaceChildren();
  $("alt-heading").hidden = true;
  $("word-hint").hidden = true;
  $("repeat").disabled = true;
}

function showResult(body) {
  result = body;
  // Each word is a button so it can be reached by keyboard; the live region reads the words as a sentence.
  const words = body.tokens.map((token, i) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "word";
    b.textContent = token;
    b.dataset.index = i;
    for (const ev of ["mouseenter", "focus"]) b.addEventListener(ev, () => highlight(i));
    for (const ev of ["mouseleave", "blur"]) b.addEventListener(ev, () => highlight(-1));
    return b;
  });
  const caption = $("caption");
  caption.replaceChildren();
  words.forEach((w, i) => caption.append(...(i ? [" ", w] : [w])));
  $("photo").alt = body.caption;
  $("score").textContent = `Model score ${body.score.toFixed(2)} (log-probability; higher is surer), ${Math.round(body.ms)} ms`;
  $("word-hint").hidden = !body.attention;
  const alts = body.alternatives.slice(1);
  $("alt-heading").hidden = alts.length === 0;
  $("alternatives").replaceChildren(...alts.map((a) => {
    const li = document.createElement("li");
    const score = document.createElement("span");
    score.className = "alt-score";
    score.textContent = ` (score ${a.score.toFixed(2)})`;
    li.append(a.caption, score);
    return li;
  }));
  $("repeat").disabled = false;
  speak(body.caption);
}

// ---- attention overlay ------------------------------------------------------------------------

function clearOverlay() {
  const canvas = $("overlay");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  canvas.dataset.word = "";
}

function highlight(index) {
  document.querySelectorAll(".word").forEach((w) => w.classList.toggle("active", +w.dataset.index === index));
  if (index < 0 || !result || !result.attention) return clearOverlay();
  const map = result.attention[index];  // (gh, gw) weights over the encoder grid
  const [gh, gw] = result.grid;
  const max = Math.max(...map.flat()) || 1;
  // Darken where the model did not look: one pixel per grid cell, then let the browser smooth it up.
  const cells = document.createElement("canvas");
  cells.width = gw;
  cells.height = gh;
  const pixels = cells.getContext("2d").createImageData(gw, gh);
  for (let y = 0; y < gh; y++) {
    for (let x = 0; x < gw; x++) {
      const o = 4 * (y * gw + x);
      pixels.data[o + 3] = Math.round(200 * (1 - map[y][x] / max));  // black, translucent
    }
  }
  cells.getContext("2d").putImageData(pixels, 0, 0);
  const img = $("photo"), canvas = $("overlay");
  canvas.width = img.clientWidth;
  canvas.height = img.clientHeight;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(cells, 0, 0, canvas.width, canvas.height);
  canvas.dataset.word = String(index);
}

// ---- speech -----------------------------------------------------------------------------------

function speak(text) {
  if (!$("speak").checked || !("speechSynthesis" in window) || !text) return;
  speechSynthesis.cancel();
  speechSynthesis.speak(new SpeechSynthesisUtterance(text));
}

// ---- camera -----------------------------------------------------------------------------------

async function startCamera() {
  showError("");
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    return showError("This browser cannot use a camera here (it needs https or localhost).");
  }
  try {
    cameraStream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" }, audio: false });
  } catch (e) {
    return showError(`Could not start the camera: ${e.message}`);
  }
  const video = $("camera");
  video.srcObject = cameraStream;
  video.hidden = false;
  await video.play();
  $("camera-start").hidden = true;
  $("camera-capture").hidden = false;
  $("camera-stop").hidden = false;
  $("camera-capture").focus();
}

function stopCamera() {
  if (cameraStream) cameraStream.getTracks().forEach((t) => t.stop());
  cameraStream = null;
  $("camera").hidden = true;
  $("camera-start").hidden = false;
  $("camera-capture").hidden = true;
  $("camera-stop").hidden = true;
  $("camera-start").focus();
}

function capturePhoto() {
  const video = $("camera");
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  canvas.toBlob((blob) => blob && captionPhoto(blob, "camera.jpg"), "image/jpeg", 0.9);
}

// ---- photo library search (only when the server has a --db) ------------------------------------

async function search(event) {
  event.preventDefault();
  const q = $("q").value.trim();
  if (!q) return;
  $("search-status").textContent = "Searching…";
  try {
    const response = await fetch(`/api/search?${new URLSearchParams({ q, limit: 24 })}`);
    const body = await response.json();
    if (!response.ok) throw new Error(body.detail);
    $("search-results").replaceChildren(...body.results.map((hit) => {
      const li = document.createElement("li");
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      img.src = `/api/library/image?${new URLSearchParams({ path: hit.path })}`;
      img.alt = hit.caption;
      img.loading = "lazy";
      const cap = document.createElement("figcaption");
      cap.textContent = hit.caption;
      fig.append(img, cap);
      li.append(fig);
      return li;
    }));
    $("search-status").textContent = `${body.results.length} photo${body.results.length === 1 ? "" : "s"} found`;
  } catch (e) {
    $("search-status").textContent = "";
    showError(`Search failed: ${e.message}`);
  }
}

// ---- wiring ------------------------------------------------------------------------------------

function firstImage(items) {
  for (const item of items) {
    const file = item instanceof File ? item : item.kind === "file" ? item.getAsFile() : null;
    if (file && file.type.startsWith("image/")) return file;
  }
  return null;
}

document.addEventListener("DOMContentLoaded", () => {
  $("file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) captionPhoto(file, file.name);
    e.target.value = "";  // choosing the same file again should caption it again
  });

  const zone = $("dropzone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const file = firstImage(e.dataTransfer.files);
    file ? captionPhoto(file, file.name) : showError("That was not an image file.");
  });
  document.addEventListener("paste", (e) => {
    const file = firstImage(e.clipboardData ? e.clipboardData.items : []);
    if (file) captionPhoto(file, "pasted image");
  });

  $("camera-start").addEventListener("click", startCamera);
  $("camera-stop").addEventListener("click", stopCamera);
  $("camera-capture").addEventListener("click", capturePhoto);

  const speakBox = $("speak");
  speakBox.checked = localStorage.getItem(SPEAK_KEY) !== "off";
  speakBox.addEventListener("change", () => {
    localStorage.setItem(SPEAK_KEY, speakBox.checked ? "on" : "off");
    if (!speakBox.checked && "speechSynthesis" in window) speechSynthesis.cancel();
  });
  $("repeat").addEventListener("click", () => result && speak(result.caption));
  window.addEventListener("resize", () => {
    const active = document.querySelector(".word.active");
    if (active) highlight(+active.dataset.index);
  });

  $("search-form").addEventListener("submit", search);
  fetch("/api/health").then((r) => r.json()).then((h) => { $("search-section").hidden = !h.search; }).catch(() => {});
});
