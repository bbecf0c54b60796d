// The captioner page: get a photo (file, drop, paste, camera), ask /api/caption, show and announce the
// caption, and draw each word's attention map over the photo when the word is hovered or focused; or, in
// live mode, describe the camera continuously over /api/live, saying a sentence when the scene changes.
//
// How the caption reaches someone who cannot see it: one live region (#announce) that screen readers
// read, once per caption; the page's own voice (speechSynthesis) only for people without a screen reader,
// who turn it on themselves (remembered), so nobody hears the caption twice.
"use strict";

const $ = (id) => document.getElementById(id);
const SPEAK_KEY = "captioner.speak";
let result = null;        // the last /api/caption answer
let pinned = -1;          // the word whose attention map stays shown (Enter or click), -1 for none
let cameraStream = null;  // the live getUserMedia stream, so it can be stopped
let announceTimer = 0;

// What the person is told: the server's wording when it has one (a hedged "Probably ..."), else the caption.
const spokenText = (body) => body.text ?? body.caption;

// ---- talking to the server ----------------------------------------------------------------

async function captionPhoto(blob, name) {
  showError("");
  clearResult();
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
    clearResult();
    hidePhoto();  // no broken or stale image left on screen
    showError(`Could not caption ${name || "the photo"}: ${e.message}`);
  } finally {
    setBusy(false);
  }
}

function setBusy(busy) {
  $("answer").setAttribute("aria-busy", String(busy));
  $("status").textContent = busy ? "Writing a caption…" : "";
  if (busy) announce("Writing a caption…");
}

// Screen readers say a live region's new text once, and say nothing when the text does not change: so the
// region is emptied first and filled a moment later, which makes Repeat (same text) heard again too.
function announce(text) {
  const region = $("announce");
  clearTimeout(announceTimer);
  region.textContent = "";
  if (text) announceTimer = setTimeout(() => { region.textContent = text; }, 150);
}

function showError(message) {
  $("error").textContent = message;
}

// ---- showing the photo and the caption -------------------------------------------------------

function showPhoto(blob, name) {
  const img = $("photo");
  hidePhoto();
  // Shown once the browser has decoded it, so a file it cannot read never appears as a broken image.
  img.onload = () => { $("stage").hidden = false; };
  img.src = URL.createObjectURL(blob);
  img.alt = `Your photo${name ? ` (${name})` : ""}`;  // the caption itself is next to it, not repeated here
}

function hidePhoto() {
  const img = $("photo");
  img.onload = null;
  $("stage").hidden = true;
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.removeAttribute("src");
  img.alt = "";
  clearOverlay();
}

function clearResult() {
  result = null;
  pinned = -1;
  announce("");
  $("caption").replaceChildren();
  $("score").textContent = "";
  $("alternatives").replaceChildren();
  $("alt-heading").hidden = true;
  $("word-hint").hidden = true;
  $("repeat").disabled = true;
  hideVideo();
}

function showResult(body) {
  result = body;
  const text = spokenText(body);
  showCaption(text, body);
  // confidence: how well the objects the sentence names are backed (grounding); tags: what the photo evidently shows
  const sure = body.confidence == null ? "" : `Confidence ${body.confidence.toFixed(2)}. `;
  const tags = (body.concepts ?? []).filter((c) => c.p >= 0.5).map((c) => c.word);
  $("score").textContent = `${sure}${tags.length ? `Tags: ${tags.join(", ")}. ` : ""}` +
    `Model score ${body.score.toFixed(2)} (log-probability; higher is surer), ${Math.round(body.ms)} ms`;
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
  announce(text);
  speak(text);
}

// The shown sentence; where it contains the model's caption word for word (it may add a hedge such as
// "Probably"), those words become one toolbar of buttons: a single Tab stop, arrow keys between words.
function showCaption(text, body) {
  const caption = $("caption");
  const start = body.attention ? text.toLowerCase().indexOf(body.caption.toLowerCase()) : -1;
  const shownWords = start < 0 ? [] : text.slice(start, start + body.caption.length).split(" ");
  $("word-hint").hidden = shownWords.length !== body.tokens.length;
  if ($("word-hint").hidden) return caption.replaceChildren(text);

  const bar = document.createElement("span");
  bar.setAttribute("role", "toolbar");
  bar.setAttribute("aria-label", "Caption words");
  bar.setAttribute("aria-describedby", "word-hint");
  bar.className = "words";
  shownWords.forEach((word, i) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "word";
    b.textContent = word;
    b.dataset.index = i;
    b.tabIndex = i === 0 ? 0 : -1;
    b.setAttribute("aria-pressed", "false");
    b.addEventListener("mouseenter", () => highlight(i));
    b.addEventListener("mouseleave", () => highlight(pinned));
    b.addEventListener("focus", () => { roveTo(i); highlight(i); });
    b.addEventListener("blur", () => highlight(pinned));
    b.addEventListener("click", () => pin(i));  // Enter and Space click a button too
    bar.append(...(i ? [" ", b] : [b]));
  });
  bar.addEventListener("keydown", wordKey);
  caption.replaceChildren(text.slice(0, start), bar, text.slice(start + body.caption.length));
}

const wordButtons = () => [...document.querySelectorAll("#caption .word")];

// Roving tabindex: the toolbar's one Tab stop is the word last visited.
function roveTo(index) {
  wordButtons().forEach((w, i) => { w.tabIndex = i === index ? 0 : -1; });
}

function wordKey(e) {
  const words = wordButtons();
  const at = words.indexOf(document.activeElement);
  const to = { ArrowRight: at + 1, ArrowDown: at + 1, ArrowLeft: at - 1, ArrowUp: at - 1,
               Home: 0, End: words.length - 1 }[e.key];
  if (to === undefined || at < 0) return;
  e.preventDefault();
  words[Math.max(0, Math.min(words.length - 1, to))].focus();
}

function pin(index) {
  pinned = pinned === index ? -1 : index;
  wordButtons().forEach((w, i) => w.setAttribute("aria-pressed", String(i === pinned)));
  highlight(pinned === -1 ? index : pinned);
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

// The page's own voice, for people who use no screen reader; off unless they turn it on.
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

// ---- a video: one description per scene (/api/video), announced as each scene plays ----------------

async function describeVideo(file) {
  showError("");
  clearResult();
  hidePhoto();
  $("answer").setAttribute("aria-busy", "true");
  $("status").textContent = "Describing the video, scene by scene…";
  announce("Describing the video, scene by scene…");
  try {
    const response = await fetch("/api/video", { method: "POST", body: file,
                                                  headers: { "content-type": file.type || "application/octet-stream" } });
    const body = await response.json().catch(() => ({ detail: `server answered ${response.status}` }));
    if (!response.ok) throw new Error(body.detail || `server answered ${response.status}`);
    showVideo(file, body);
  } catch (e) {
    showError(`Could not describe ${file.name}: ${e.message}`);
  } finally {
    $("answer").setAttribute("aria-busy", "false");
    $("status").textContent = "";
  }
}

const clock = (s) => `${Math.floor(s / 60)}:${(s % 60).toFixed(1).padStart(4, "0")}`;

function showVideo(file, body) {
  const video = $("clip");
  video.src = URL.createObjectURL(file);
  const track = document.createElement("track");
  Object.assign(track, { kind: "descriptions", label: "Scene descriptions", srclang: "en", default: true });
  track.src = URL.createObjectURL(new Blob([body.vtt], { type: "text/vtt" }));
  video.replaceChildren(track);
  track.track.mode = "hidden";  // its cues fire without being drawn: the page says them
  track.addEventListener("cuechange", () => {
    const cue = track.track.activeCues[0];
    const text = cue && cue.getCueAsHTML().textContent;
    if (text) {
      announce(text);
      speak(text);
    }
  });
  $("scenes").replaceChildren(...body.cues.map((c) => {
    const li = document.createElement("li");
    li.textContent = `${clock(c.start)} to ${clock(c.end)}: ${c.text}`;
    return li;
  }));
  $("vtt-link").href = track.src;
  $("video-result").hidden = false;
  const n = body.cues.length;
  const summary = `${file.name}: ${n} scene${n === 1 ? "" : "s"} described.`;
  $("caption").textContent = summary;
  if (body.error) showError(`${body.error}. The scenes before it are described.`);
  announce(`${summary} Play the video to hear each scene as it starts.`);
}

function hideVideo() {
  const video = $("clip");
  video.pause();
  for (const url of [video.src, $("vtt-link").href]) if (url.startsWith("blob:")) URL.revokeObjectURL(url);
  video.removeAttribute("src");
  video.replaceChildren();
  $("vtt-link").removeAttribute("href");
  $("scenes").replaceChildren();
  $("video-result").hidden = true;
}

// ---- live mode: describe the camera continuously over a WebSocket (/api/live) -----------------------
//
// One frame in flight: the next is taken when the answer to the last arrives, so frames go at the rate the
// server sustains (at most 10 a second) and nothing queues. The caption on screen follows every answer; a
// sentence is said (live region, and the page's voice when chosen) only when the scene has changed:
//  - the frame differs from the one last described by more than SCENE_HIGH (a small grayscale thumbnail), or
//    by more than SCENE_LOW and the description differs too (two thresholds: hysteresis), and
//  - the next answer gives the same description (a passing blur or a turn of the head says nothing).
// A sentence being spoken is never cut: the newest waiting one follows it.

const SCENE_HIGH = 0.12, SCENE_LOW = 0.05, MIN_FRAME_MS = 100, LIVE_SIDE = 480;
const live = { ws: null, on: false, paused: false, busy: false, thumb: null, sentAt: 0, said: "", saidThumb: null,
               candidate: "", queued: "" };

function liveThumb(video) {
  const c = document.createElement("canvas");
  c.width = c.height = 16;
  const ctx = c.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(video, 0, 0, 16, 16);
  const d = ctx.getImageData(0, 0, 16, 16).data;
  const gray = [];
  for (let i = 0; i < d.length; i += 4) gray.push((0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2]) / 255);
  const mean = gray.reduce((a, b) => a + b, 0) / gray.length;
  return gray.map((g) => g - mean);  // brightness taken out: the camera adjusting its exposure is no new scene
}

const thumbDifference = (a, b) => a.reduce((sum, x, i) => sum + Math.abs(x - b[i]), 0) / a.length;

async function startLive() {
  showError("");
  if (!cameraStream) await startCamera();
  if (!cameraStream) return;  // startCamera said why
  clearResult();
  hidePhoto();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const beam = Math.min(10, Math.max(1, parseInt($("beam").value, 10) || 3));
  const ws = new WebSocket(`${scheme}://${location.host}/api/live?beam=${beam}`);
  Object.assign(live, { ws, on: true, paused: false, busy: false, said: "", saidThumb: null, candidate: "",
                        queued: "" });
  ws.onopen = () => sendFrame();
  ws.onmessage = (e) => liveAnswer(JSON.parse(e.data));
  ws.onclose = () => {
    if (live.ws === ws && live.on) {
      showError("Live description stopped: the connection to the server closed.");
      stopLive();
    }
  };
  for (const id of ["camera-start", "camera-capture", "camera-stop", "live-start"]) $(id).hidden = true;
  $("live-pause").hidden = $("live-stop").hidden = false;
  setLivePaused(false);
  $("live-stop").focus();
}

function sendFrame() {
  if (!live.on || live.paused || live.busy || !live.ws || live.ws.readyState !== WebSocket.OPEN) return;
  const video = $("camera");
  if (!video.videoWidth) return setTimeout(sendFrame, MIN_FRAME_MS);
  const scale = Math.min(1, LIVE_SIDE / Math.max(video.videoWidth, video.videoHeight));
  const canvas = document.createElement("canvas");
  canvas.width = Math.round(video.videoWidth * scale);
  canvas.height = Math.round(video.videoHeight * scale);
  canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
  live.busy = true;
  live.thumb = liveThumb(video);
  live.sentAt = performance.now();
  canvas.toBlob((blob) => {
    if (blob && live.ws && live.ws.readyState === WebSocket.OPEN) live.ws.send(blob);
    else live.busy = false;
  }, "image/jpeg", 0.8);
}

function liveAnswer(body) {
  live.busy = false;
  if (!live.on) return;
  const wait = Math.max(0, MIN_FRAME_MS - (performance.now() - live.sentAt));
  setTimeout(sendFrame, body.retry_ms ?? wait);
  if (body.error) {
    $("status").textContent = body.error;  // shown, not announced: the next frame usually answers
    return;
  }
  $("status").textContent = "";
  const text = spokenText(body);
  if ($("caption").textContent !== text) $("caption").textContent = text;
  const tags = (body.concepts ?? []).filter((c) => c.p >= 0.5).map((c) => c.word);
  $("score").textContent = `${tags.length ? `Tags: ${tags.join(", ")}. ` : ""}` +
    `${Math.round(performance.now() - live.sentAt)} ms from frame to caption`;
  if (live.paused) return;
  const moved = live.saidThumb ? thumbDifference(live.thumb, live.saidThumb) : 1;
  const changed = moved > SCENE_HIGH || (moved > SCENE_LOW && text !== live.said);
  if (!changed) {
    live.candidate = "";
    return;
  }
  if (text !== live.candidate) {  // wait for the next answer to say the same
    live.candidate = text;
    return;
  }
  live.candidate = "";
  live.saidThumb = live.thumb;
  if (text === live.said) return;  // a new view, the same words: nothing new to say
  live.said = text;
  result = { text, caption: body.caption };
  $("repeat").disabled = false;
  announce(text);
  speakCalm(text);
}

// The page's voice in live mode: a sentence is finished before the next (the newest waiting) is said.
function speakCalm(text) {
  if (!$("speak").checked || !("speechSynthesis" in window) || !text) return;
  if (speechSynthesis.speaking || speechSynthesis.pending) {
    live.queued = text;
    return;
  }
  const utterance = new SpeechSynthesisUtterance(text);
  utterance.onend = utterance.onerror = () => {
    const next = live.queued;
    live.queued = "";
    if (next && live.on) speakCalm(next);
  };
  speechSynthesis.speak(utterance);
}

function setLivePaused(paused) {
  live.paused = paused;
  live.candidate = "";
  const indicator = $("live-indicator");
  indicator.hidden = false;
  indicator.classList.toggle("paused", paused);
  indicator.textContent = paused ? "Live description paused (Esc resumes)" : "Live: describing the camera (Esc pauses)";
  $("live-pause").textContent = paused ? "Resume" : "Pause";
  announce(paused ? "Live description paused" : "Live description on");
  if (!paused) sendFrame();
}

function stopLive() {
  const ws = live.ws;
  Object.assign(live, { ws: null, on: false, paused: false, busy: false, queued: "" });
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close();
  $("live-indicator").hidden = true;
  $("live-pause").hidden = $("live-stop").hidden = true;
  stopCamera();  // releases the camera; shows the camera and live buttons again
  $("live-start").hidden = false;
  $("live-start").focus();
  announce("Live description stopped");
}

// ---- library search (only when the server has a --db) ------------------------------------------

// One result: a link to the photo, or to the video at the scene's time (a media fragment: the browser plays
// from start to end), named by its caption. The preview is hidden from screen readers (empty alt, aria-hidden)
// so the caption is heard once, not again as the image's or the video's name; a scene's link adds its time.
function searchResult(hit) {
  const li = document.createElement("li");
  const link = document.createElement("a");
  const file = `/api/library/image?${new URLSearchParams({ path: hit.path })}`;
  const scene = hit.start != null;
  link.href = scene ? `${file}#t=${hit.start},${hit.end}` : file;
  const preview = document.createElement(scene ? "video" : "img");
  preview.src = link.href;  // a scene's preview shows its first frame
  if (scene) {
    Object.assign(preview, { preload: "metadata", muted: true });
    preview.setAttribute("aria-hidden", "true");
  } else {
    Object.assign(preview, { alt: "", loading: "lazy" });
  }
  const cap = document.createElement("span");
  cap.textContent = hit.caption;
  link.append(preview, cap);
  if (scene) {
    const when = document.createElement("span");
    when.textContent = ` (video, ${clock(hit.start)} to ${clock(hit.end)})`;
    link.append(when);
  }
  li.append(link);
  return li;
}

const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

async function search(event) {
  event.preventDefault();
  const q = $("q").value.trim();
  if (!q) return;
  $("search-status").textContent = "Searching…";
  try {
    const response = await fetch(`/api/search?${new URLSearchParams({ q, limit: 24 })}`);
    const body = await response.json();
    if (!response.ok) throw new Error(body.detail);
    $("search-results").replaceChildren(...body.results.map(searchResult));
    const scenes = body.results.filter((hit) => hit.start != null).length;
    const photos = body.results.length - scenes;
    const parts = [photos || !scenes ? plural(photos, "photo") : "", scenes ? plural(scenes, "video scene") : ""];
    $("search-status").textContent = `${parts.filter(Boolean).join(" and ")} found`;
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
    if (file && file.type.startsWith("video/")) describeVideo(file);
    else if (file) captionPhoto(file, file.name);
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
  $("live-start").addEventListener("click", startLive);
  $("live-pause").addEventListener("click", () => setLivePaused(!live.paused));
  $("live-stop").addEventListener("click", stopLive);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && live.on) {
      e.preventDefault();
      setLivePaused(!live.paused);
    }
  });

  const speakBox = $("speak");
  speakBox.checked = localStorage.getItem(SPEAK_KEY) === "on";  // an explicit choice; off by default
  speakBox.addEventListener("change", () => {
    localStorage.setItem(SPEAK_KEY, speakBox.checked ? "on" : "off");
    if (!speakBox.checked && "speechSynthesis" in window) speechSynthesis.cancel();
  });
  $("repeat").addEventListener("click", () => {
    if (!result) return;
    announce(spokenText(result));
    speak(spokenText(result));
  });
  window.addEventListener("resize", () => {
    const active = document.querySelector(".word.active");
    if (active) highlight(+active.dataset.index);
  });

  $("search-form").addEventListener("submit", search);
  fetch("/api/health").then((r) => r.json()).then((h) => { $("search-section").hidden = !h.search; }).catch(() => {});
});
