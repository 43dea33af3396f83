// edge-inspect operator console: live tiles, defect feed, similar past frames, labels, what the model
// learned from false alarms (with undo), capture export and canary roll-out of bundles.
// Plain browser JavaScript, no build step, no external assets. Updates are pushed by the
// console as server-sent events; the DOM is touched at most once per animation frame.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const enc = encodeURIComponent;
const FEED_MAX = 100;  // feed items the page lists, more for each "Load older" (the console keeps console.history)
const PLOT_EVERY_MS = 1000;
const RECONNECT_MS = 2000;  // a refused event stream is asked for again after this long (as the console's "retry")
const FEED_EVERY_MS = 250;  // new feed items are added in batches: a busy line must not keep the page busy
const cams = new Map();  // camera -> {el, latest, dirty, points, plotted}, the most recently active last
const pills = new Map();  // worker id -> its pill, the most recently updated last
let seriesSeconds = 3600;
let maxCameras = 64, maxWorkers = 32;  // the console's bounds (console.max_cameras, console.max_workers): a page open
// for weeks forgets, as the console does, the tile and the pill quiet the longest past them
let feedPending = [];
let feedOverflow = false;  // new items were dropped from feedPending before they were listed: older ones exist
let feedLimit = FEED_MAX;  // items the feed keeps now: FEED_MAX, plus those the operator loaded older
let feedExpire = false;  // set every PLOT_EVERY_MS: the next frame drops feed items past the chosen time window
let feedSeq = 0;  // the newest feed listing: an answer to an earlier one (another filter) is dropped
// The defects received since the feed was last asked for (the newest FEED_MAX): the console may have made its listing
// before they came, so they are added to it again (an item already listed is replaced by its own).
let feedArrived = [];
let renderQueued = false;
let feedAt = 0, feedTimer = 0;
let overlay = 1;
// The console's clock minus this browser's, in seconds (from its state and each new result): receive times
// (seen_at), the feed's window and the plots are the console's, and the operator's machine may be hours off the box's.
let clockSkew = 0;
const consoleNow = () => Date.now() / 1000 + clockSkew;
let controlled = null;  // the worker id this console sends control commands to (config worker.id)
let controlledWas;  // its availability as last shown
const modelSeen = new Map();  // worker id -> the scopes' versions last shown: a change refreshes "Learned"

// `seen` (when the console got the result) names the frame in the address: a camera that reuses a frame id sends
// another picture under it, which the browser's cache would otherwise show in its place.
const imageUrl = (camera, frameId, kind, seen) =>
  `api/frames/${enc(camera)}/${enc(frameId)}/${kind}${seen === undefined ? "" : `?seen=${seen}`}`;
const keyOf = (camera, frameId) => `${camera}/${frameId}`;  // neither may contain "/" (topic level, API rule)
const fmtTime = (iso) => { const d = new Date(iso); return isNaN(d) ? String(iso) : d.toLocaleString(); };
// A tile's capture time: the time of day, with the date when it is not today (a camera clock reset to 2000 shows).
const fmtCaptured = (iso) => {
  const d = new Date(iso);
  if (isNaN(d)) return String(iso);
  return d.toDateString() === new Date().toDateString() ? d.toLocaleTimeString() : d.toLocaleString();
};

// How late a frame reached the worker (hub.py, LATE_AFTER_S): an outage's frames, delivered in a burst, are not new.
// Rounded to whole minutes first: 2 h less 10 s read "1 h 60 min".
const fmtAge = (s) => {
  const minutes = Math.round(s / 60);
  return minutes < 60 ? `${minutes} min`
    : s < 86400 ? `${Math.floor(minutes / 60)} h ${minutes % 60} min` : `${(s / 86400).toFixed(1)} days`;
};
function showLate(el, r) {
  el.hidden = !r.late_s;
  el.textContent = r.late_s ? `late: captured ${fmtAge(r.late_s)} before the worker answered it` : "";
  el.title = r.late_s ? "a frame the broker kept while the worker was away, delivered late (or the camera's clock is "
    + "behind the box's): not a current one" : "";
}

// A model as shown: name, version and the precision it runs at (one bundle at f32 and f16 has two thresholds).
const modelText = (m) => `${m.name || ""} ${m.version || ""}` + (m.precision ? ` · ${m.precision}` : "");

// Latest-wins image loading: a tile never queues up stale images behind a slow one. An image that cannot be loaded
// (the console forgot it, the network failed) leaves the tile without a picture, never with the frame before's.
function show(img, url) {
  img._want = url;
  if (img._busy) return;
  const next = () => {
    const u = img._want;
    if (!u || u === img._have) { img._busy = false; return; }
    img._busy = true;
    const probe = new Image();
    probe.onload = () => { img.src = u; img._have = u; next(); };
    probe.onerror = () => { img.removeAttribute("src"); img._have = u; next(); };
    probe.src = u;
  };
  next();
}

// A picture that opens "Similar past frames": by click, and by Enter or Space once focused (Tab reaches it).
function pressable(el, action) {
  el.tabIndex = 0;
  el.setAttribute("role", "button");
  el.title = "similar past frames";
  el.addEventListener("click", action);
  el.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); action(); }
  });
}

// The camera pickers: the feed's filter, the search's, the capture export's and the model commands'.
const CAMERA_CHOICES = ["#feed-camera", "#q-camera", "#cap-camera", "#m-camera"];

// The camera's tile, made if it has none, and moved to the most recently active end of `cams`.
function camera(name) {
  let cam = cams.get(name);
  if (cam) { cams.delete(name); cams.set(name, cam); return cam; }
  if (cams.size >= maxCameras) forgetCamera(cams.keys().next().value);
  const el = $("#tile-tpl").content.firstElementChild.cloneNode(true);
  el.dataset.camera = name;
  $(".cam", el).textContent = name;
  pressable($(".pics", el), () => cam.latest && openSimilar(cam.latest));
  const tiles = $("#tiles");
  $(".empty", tiles)?.remove();
  const after = [...tiles.children].find((t) => t.dataset.camera > name);
  tiles.insertBefore(el, after || null);
  cam = {el, latest: null, dirty: false, points: [], plotted: 0};
  cams.set(name, cam);
  if (lastErrors.has(name)) showError(cam, lastErrors.get(name));
  for (const sel of CAMERA_CHOICES) {
    const kept = [...$(sel).options].find((o) => o.value === name);  // still chosen since its tile went: back
    if (kept) { kept.textContent = name; delete kept.dataset.gone; } else $(sel).append(new Option(name, name));
  }
  return cam;
}

// A camera the console no longer keeps (console.max_cameras) leaves every picker, except one where it is chosen: it
// stays chosen there and says its tile went. Removed, the picker read "all cameras" (or the default scope) while the
// feed stayed filtered on it, or new items of every camera joined, and a rollback went to the default scope.
function forgetCamera(name) {
  cams.get(name).el.remove();
  cams.delete(name);
  for (const sel of CAMERA_CHOICES) {
    for (const opt of [...$(sel).options]) {
      if (opt.value !== name) continue;
      if (opt.selected) { opt.textContent = `${name} (quiet: its tile was dropped)`; opt.dataset.gone = "1"; }
      else opt.remove();
    }
  }
}

// Another camera chosen: a camera kept only because it was chosen leaves the picker.
for (const sel of CAMERA_CHOICES) {
  $(sel).addEventListener("change", (e) => {
    for (const opt of [...e.target.options]) if (opt.dataset.gone && !opt.selected) opt.remove();
  });
}

function addPoint(cam, at, score) {
  const step = seriesSeconds / 360;
  const start = at - (at % step);
  const last = cam.points[cam.points.length - 1];
  if (last && last[0] === start) last[1] = Math.max(last[1], score);
  else if (!last || start > last[0]) cam.points.push([start, score]);
  else {  // a late frame, placed back at its capture time (hub.py)
    const i = cam.points.findIndex((p) => p[0] >= start);
    if (cam.points[i][0] === start) cam.points[i][1] = Math.max(cam.points[i][1], score);
    else cam.points.splice(i, 0, [start, score]);
  }
  const horizon = consoleNow() - seriesSeconds;
  while (cam.points.length && cam.points[0][0] < horizon) cam.points.shift();
}

function drawPlot(cam) {
  const canvas = $(".plot", cam.el);
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, now = consoleNow();
  const x = (t) => ((t - (now - seriesSeconds)) / seriesSeconds) * W;
  const y = (s) => H - 2 - Math.min(1, Math.max(0, s)) * (H - 4);
  ctx.clearRect(0, 0, W, H);
  ctx.strokeStyle = "#c0392b"; ctx.setLineDash([4, 3]);
  ctx.beginPath(); ctx.moveTo(0, y(0.5)); ctx.lineTo(W, y(0.5)); ctx.stroke();
  ctx.setLineDash([]);
  ctx.fillStyle = "#c0392b"; ctx.font = "10px sans-serif"; ctx.fillText("threshold", 2, y(0.5) - 2);
  ctx.fillStyle = "#777"; ctx.fillText(`last ${Math.round(seriesSeconds / 60)} min`, W - 62, H - 3);
  ctx.strokeStyle = "#2c6fbb"; ctx.lineWidth = 1.2; ctx.beginPath();
  cam.points.forEach(([t, s], i) => (i ? ctx.lineTo(x(t), y(s)) : ctx.moveTo(x(t), y(s))));
  ctx.stroke();
  ctx.fillStyle = "#c0392b";
  for (const [t, s] of cam.points) if (s >= 0.5) ctx.fillRect(x(t) - 1.5, y(s) - 1.5, 3, 3);
  cam.plotted = performance.now();
}

function renderTile(cam) {
  const r = cam.latest, el = cam.el;
  el.classList.toggle("anomalous", r.verdict === "anomalous");
  $(".verdict", el).textContent = r.verdict;
  $(".score", el).textContent = `score ${Number(r.score).toFixed(3)} (raw ${r.raw_score} / ${r.threshold})`;
  $(".fid", el).textContent = `${r.frame_id} · ${fmtCaptured(r.captured_at)}`;
  $(".model", el).textContent = r.model ? modelText(r.model) : "";
  showLate($(".late", el), r);
  // why the worker says this camera's frames are not what the model learned (another shape, grey for a colour model)
  const unlike = $(".unlike", el), note = typeof r.unlike_training === "string" ? r.unlike_training : "";
  unlike.hidden = !note;
  unlike.textContent = note && `unlike training: ${note}`;
  unlike.title = note;
  const frame = $(".frame", el), heat = $(".heat", el);
  // The worker's heatmap is already blended over the frame: the camera image is only fetched when it shows.
  const needFrame = r.has_frame && (!r.has_heatmap || overlay < 1);
  frame.hidden = !needFrame;
  heat.hidden = !r.has_heatmap;
  heat.style.opacity = needFrame ? overlay : 1;
  if (needFrame) show(frame, imageUrl(r.camera, r.frame_id, "frame", r.seen_at));
  if (r.has_heatmap) show(heat, imageUrl(r.camera, r.frame_id, "heatmap", r.seen_at));
  el.dataset.frameId = r.frame_id;
  el.dataset.publishedAt = r.published_at;  // lets a test or benchmark measure publish-to-screen time
}

function render() {
  renderQueued = false;
  const now = performance.now();
  for (const cam of cams.values()) {
    // One tile that cannot be drawn must not stop the others, the plots or the feed: its error is logged.
    try {
      if (cam.dirty) { cam.dirty = false; renderTile(cam); }
      if (now - cam.plotted > PLOT_EVERY_MS) drawPlot(cam);
    } catch (err) {
      cam.plotted = now;
      console.error("console: tile", cam.el && cam.el.dataset.camera, err);
    }
  }
  if (feedPending.length && now - feedAt >= FEED_EVERY_MS) {
    feedAt = now;
    const list = $("#defects");
    // The last received first, as /api/defects lists them: events come in the console's receive order.
    for (const r of feedPending) {
      // a new frame under an id already listed (a camera that reused it) takes the earlier one's item, as in the hub
      for (const old of list.querySelectorAll(`li.card[data-key="${CSS.escape(keyOf(r.camera, r.frame_id))}"]`)) {
        old.remove();
      }
      list.insertBefore(card(r), list.firstElementChild);
    }
    // the console still has those: the items past the list's limit, or those that came too fast to be listed at all
    if (feedOverflow || list.children.length > feedLimit) $("#feed-more").hidden = false;
    feedOverflow = false;
    while (list.children.length > feedLimit) list.lastElementChild.remove();
    feedPending = [];
  } else if (feedPending.length && !feedTimer) {
    feedTimer = setTimeout(() => { feedTimer = 0; schedule(); }, FEED_EVERY_MS);
  }
  if (feedExpire) { feedExpire = false; expireFeed(); }
}

// Feed items leave as they pass out of the time window shown ("last 5 min"), as they would from a new listing.
function expireFeed() {
  const since = $("#feed-since").value;
  if (!since) return;
  const horizon = consoleNow() - Number(since);
  for (const li of [...$("#defects").children]) if (Number(li.dataset.seenAt) < horizon) li.remove();
}

function schedule() {
  if (!renderQueued) { renderQueued = true; requestAnimationFrame(render); }
}

function feedMatches(r) {
  const camSel = $("#feed-camera").value, since = $("#feed-since").value;
  return (!camSel || r.camera === camSel) && (!since || r.seen_at >= consoleNow() - Number(since));
}

// The console decides (hub.py): "tile" when this frame is its camera's tile now, "first" when its result is new
// rather than a late image or a repeat. Camera clocks can be years off, so the page compares no capture times.
function onFrame(r) {
  // a new result's seen_at is the console's clock as it sent it: followed when either clock steps with the page open
  if (r.first) clockSkew = r.seen_at - Date.now() / 1000;
  const cam = camera(r.camera);
  if (r.first) addPoint(cam, r.seen_at - (r.late_s || 0), r.score);  // a late frame at its capture time
  if (r.tile) { cam.latest = r; cam.dirty = true; }
  if (r.verdict === "anomalous" && r.first) {
    if (feedArrived.push(r) > FEED_MAX) feedArrived.shift();
    // Only the newest FEED_MAX are ever listed from it; a tab in the background runs no animation frame to empty it.
    if (feedMatches(r) && feedPending.push(r) > FEED_MAX) { feedPending.shift(); feedOverflow = true; }
  }
  schedule();
}

// A feed item's thumbnail is made after its result, on a thread of its own (hub.py): shown when it comes.
function onThumbnail(t) {
  const key = keyOf(t.camera, t.frame_id);
  for (const r of feedPending) if (keyOf(r.camera, r.frame_id) === key) r.has_thumbnail = true;
  for (const img of document.querySelectorAll(`#defects li.card[data-key="${CSS.escape(key)}"] img.thumb`)) {
    img.src = imageUrl(t.camera, t.frame_id, "thumbnail", t.seen_at);
    img.hidden = false;
  }
}

function labelText(label, type) {
  if (!label) return "";
  return label === "false_alarm" ? "false alarm" : `confirmed${type ? ": " + type : ""}`;
}

// A feed item or a similar-frame hit: images, facts, label buttons.
function card(r, hit = false) {
  const li = $("#card-tpl").content.firstElementChild.cloneNode(true);
  li.dataset.key = keyOf(r.camera, r.frame_id);
  li.dataset.camera = r.camera;
  li.dataset.frameId = r.frame_id;
  if (r.seen_at !== undefined) li.dataset.seenAt = r.seen_at;  // a feed item: when the console got it
  li.classList.toggle("anomalous", r.verdict === "anomalous");
  const thumb = $(".thumb", li), hm = $(".hm", li);
  if (hit) {
    thumb.src = r.thumbnail_b64 ? `data:image/jpeg;base64,${r.thumbnail_b64}` : "";
    hm.src = r.heatmap_b64 ? `data:image/jpeg;base64,${r.heatmap_b64}` : "";
  } else {
    thumb.src = r.has_thumbnail ? imageUrl(r.camera, r.frame_id, "thumbnail", r.seen_at) : "";
    hm.src = r.has_heatmap ? imageUrl(r.camera, r.frame_id, "heatmap", r.seen_at) : "";
  }
  thumb.hidden = !thumb.getAttribute("src");
  hm.hidden = !hm.getAttribute("src");
  $(".title", li).textContent = hit ? `${(r.similarity * 100).toFixed(1)}% · ${r.camera}` : r.camera;
  $(".sub", li).textContent = `${fmtTime(r.captured_at)} · score ${Number(r.score).toFixed(3)} · ${r.verdict} · ${r.frame_id}`
    + (hit && r.model_version ? ` · ${r.model_version}` : "");
  $(".lab", li).textContent = labelText(r.label, r.defect_type);
  showLate($(".late", li), r);
  pressable($(".pics2", li), () => openSimilar(r));
  $(".fa", li).addEventListener("click", () => setLabel(r, "false_alarm", null, li));
  $(".cd", li).addEventListener("click", () => setLabel(r, "confirmed_defect", $(".dt", li).value.trim() || null, li));
  $(".cl", li).addEventListener("click", () => setLabel(r, null, null, li));
  return li;
}

async function setLabel(r, label, defectType, li) {
  const status = $(".lab", li);
  status.textContent = "saving…";
  // captured_at: the frame shown, not a later one a camera sent under its id (the worker refuses the label then)
  const answer = await ask("api/labels", {frame_id: r.frame_id, camera: r.camera, captured_at: r.captured_at ?? null,
                                          label, defect_type: defectType});
  if (!answer.ok) { status.textContent = `${failedHow(answer, "not saved")}: ${answer.error?.message || "error"}`; return; }
  r.label = answer.label; r.defect_type = answer.defect_type;
  if (defectType) rememberDefectType(defectType);
  applyLabel({camera: r.camera, frame_id: r.frame_id, label: answer.label, defect_type: answer.defect_type,
              learned: learnedText(answer)});
  loadLearned();
}

// What a label taught the model (or why it taught nothing), in the worker's words (as learned_text in app.py).
function learnedText(answer) {
  const change = answer.absorbed || answer.released;
  const capture = typeof answer.capture === "string" ? answer.capture : "";  // a confirmed defect left the capture
  if (!change) return capture;
  const text = change.message || `${answer.absorbed ? "not absorbed" : "nothing to release"}: ${change.reason || "no reason given"}`;
  return capture ? `${text}; ${capture}` : text;
}

function applyLabel(l) {
  // Frame cards only: the Learned panel's entries carry the same data-key but no label fields.
  for (const li of document.querySelectorAll(`li.card[data-key="${CSS.escape(keyOf(l.camera, l.frame_id))}"]`)) {
    $(".lab", li).textContent = labelText(l.label, l.defect_type) || "label cleared";
    $(".learn", li).textContent = l.learned || "";
    li.classList.add("labelled");
  }
}

function rememberDefectType(type) {
  const list = $("#defect-types");
  if (![...list.options].some((o) => o.value === type)) list.append(new Option(type, type));
}

// ---- similar past frames ------------------------------------------------------------------
let currentQuery = null;
let searchSeq = 0;  // the newest search: an answer to an earlier one (slower, or for another frame) is dropped,
// and counted in #q-status's data-superseded

function openSimilar(source) {
  currentQuery = source;
  const box = $("#query-frame");
  box.replaceChildren();
  if (source.image_b64) {
    const img = new Image(); img.src = `data:image/*;base64,${source.image_b64}`; img.className = "qimg";
    const p = document.createElement("p"); p.textContent = `uploaded image ${source.name || ""}`;
    box.append(img, p);
  } else {
    const ownImages = source.has_heatmap !== undefined;
    box.append(card(source, !ownImages));
  }
  const dlg = $("#similar");
  if (!dlg.open) dlg.showModal();
  search();
}

function dtToEpoch(value) { return value ? new Date(value).getTime() / 1000 : null; }

async function search(event) {
  event?.preventDefault();
  if (!currentQuery) return;
  const seq = ++searchSeq;
  const cameraSel = $("#q-camera").value;
  const request = {
    top_k: Number($("#q-topk").value) || 8,
    filters: {cameras: cameraSel ? [cameraSel] : [], anomalous_only: $("#q-anomalous").checked,
              since: dtToEpoch($("#q-since").value), until: dtToEpoch($("#q-until").value)},
  };
  if (currentQuery.image_b64) request.image_b64 = currentQuery.image_b64;
  else {  // captured_at: the frame shown, not a later one a camera sent under its id (then: by the image, below)
    request.frame_id = currentQuery.frame_id; request.camera = currentQuery.camera;
    if (currentQuery.captured_at) request.captured_at = currentQuery.captured_at;
  }
  const status = $("#q-status"), hits = $("#hits");
  const superseded = () => {
    if (seq === searchSeq) return false;
    status.dataset.superseded = String(Number(status.dataset.superseded || 0) + 1);
    return true;
  };
  status.textContent = "searching…";
  hits.replaceChildren();
  const started = performance.now();
  let answer = await ask("api/similar", request);
  if (superseded()) return;
  let how = "";
  if (answer.error?.code === "unknown_frame" && currentQuery.has_frame) {
    // Not (yet) in the store: a normal frame not logged (store.log_normal_every) or still being written, or one
    // whose id the camera has given a later frame since. The console still has the camera's image: ask by image.
    const blob = await fetch(imageUrl(currentQuery.camera, currentQuery.frame_id, "frame", currentQuery.seen_at))
      .then((res) => res.blob()).catch(() => null);
    if (blob) {
      const b64 = await new Promise((ok) => { const r = new FileReader(); r.onload = () => ok(String(r.result).split(",", 2)[1]); r.readAsDataURL(blob); });
      delete request.frame_id;  // the camera stays: the model serving it embeds the image, as it did its frames
      delete request.captured_at;
      request.image_b64 = b64;
      answer = await ask("api/similar", request);
      if (superseded()) return;
      how = " by its image: the frame is not in the history";
    } else answer = {ok: false, error: {code: "unreachable", message: "console unreachable"}};
  }
  if (answer.error?.code === "unreachable") { status.textContent = "not sent: console unreachable"; return; }
  if (!answer.ok) { status.textContent = `error: ${answer.error?.code || ""} ${answer.error?.message || ""}`; return; }
  status.textContent = `${answer.hits.length} similar frames${how} (${Math.round(performance.now() - started)} ms, worker ${answer.took_ms} ms)${answer.note ? `; ${answer.note}` : ""}`;
  hits.replaceChildren(...answer.hits.map((h) => card(h, true)));
}

// ---- learned, capture, models ---------------------------------------------------------------
// The console's JSON answer to a GET (no body) or a POST; a fetch that fails (the console is down, the network or
// a proxy is) is the answer {ok: false, error: {code: "unreachable"}}, so no status is left saying "saving…".
async function ask(path, body) {
  let res;
  try {
    res = await fetch(path, body === undefined ? {} :
      {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  } catch {
    return {ok: false, error: {code: "unreachable", message: "console unreachable"}};
  }
  return res.json().catch(() => ({ok: false, error: {message: `HTTP ${res.status}`}}));
}

// How a request that failed ended: nothing reached a worker, or it did and no answer came in time (the worker may
// still carry it out), or the worker said no.
function failedHow(answer, refused = "refused") {
  const code = answer.error?.code;
  if (code === "no_answer") return "unknown: the worker may still apply it";
  return NOT_SENT.has(code) ? "not sent" : refused;
}
const NOT_SENT = new Set(["unreachable", "worker_offline", "unknown_worker", "broker_refused", "broker_unreachable"]);

function setStatus(sel, text, bad = false) {
  const el = $(sel);
  el.textContent = text;
  el.classList.toggle("bad", bad);
}

let learnedBusy = false, learnedAgain = false;

// Asks the worker what its extensions hold; calls that arrive meanwhile are folded into one more ask.
async function loadLearned() {
  if (learnedBusy) { learnedAgain = true; return; }
  learnedBusy = true;
  try {
    do {
      learnedAgain = false;
      const answer = await ask("api/extensions");
      const status = $("#learned-status");
      if (answer.ok) {
        renderLearned(answer.extensions);
        if (status.dataset.listing) { delete status.dataset.listing; setStatus("#learned-status", ""); }
      } else {
        setStatus("#learned-status", `cannot list: ${answer.error?.message || "error"}`, true);
        status.dataset.listing = "failed";  // cleared by the next listing that succeeds, not by an undo's words
        if (!learnedListed) $("#learned-list").replaceChildren();  // not "Nothing learned yet": nobody said so
      }
    } while (learnedAgain);
  } finally { learnedBusy = false; }
}

let learnedListed = false;  // a worker has listed what it learned, once at least

function renderLearned(extensions) {
  learnedListed = true;
  const box = $("#learned-list");
  const byCamera = new Map();
  const summary = [];
  for (const ext of extensions) {
    const held = ext.held_rows ? `, ${ext.held_rows} more held (learning.max_rows ${ext.max_rows_to_serve_all} serves them)` : "";
    summary.push(`${ext.bundle} (${ext.scopes.join(", ")}): ${ext.rows}/${ext.max_rows} rows${held}, revision ${ext.revision}`);
    for (const e of ext.entries) {
      if (!byCamera.has(e.camera)) byCamera.set(e.camera, []);
      byCamera.get(e.camera).push(e);
    }
  }
  const nodes = [];
  if (summary.length) {
    const p = document.createElement("p"); p.className = "sub"; p.textContent = summary.join(" · ");
    nodes.push(p);
  }
  for (const [cam, entries] of [...byCamera].sort(([a], [b]) => (a < b ? -1 : 1))) {
    const div = document.createElement("div"); div.className = "learned-cam"; div.dataset.camera = cam;
    const h = document.createElement("h3"); h.textContent = cam;
    const ul = document.createElement("ul");
    entries.sort((a, b) => Date.parse(b.at) - Date.parse(a.at));
    for (const e of entries) {
      const li = document.createElement("li");
      li.dataset.key = keyOf(e.camera, e.frame_id);
      const what = document.createElement("span"); what.className = "what";
      what.textContent = `${e.frame_id} · ${e.rows} patches · ${fmtTime(e.at)}`;
      // The worker's doubts about this entry: held past the bound, a withdrawal it leaned on, or no label naming it.
      const doubt = [e.held, e.no_longer_pass, e.unrecorded].filter(Boolean).join("; ");
      if (doubt) { what.textContent += ` · ${doubt}`; li.classList.add("doubt"); }
      const undo = document.createElement("button"); undo.type = "button"; undo.className = "undo"; undo.textContent = "Undo";
      undo.title = "withdraw the false-alarm label: frames like it are flagged again";
      undo.addEventListener("click", () => unlearn(e, undo));
      li.append(what, undo);
      ul.append(li);
    }
    div.append(h, ul);
    nodes.push(div);
  }
  if (!byCamera.size) {
    const p = document.createElement("p"); p.className = "empty"; p.textContent = "Nothing learned yet.";
    nodes.push(p);
  }
  box.replaceChildren(...nodes);
}

async function unlearn(entry, button) {
  button.disabled = true;
  setStatus("#learned-status", `undoing ${entry.frame_id}…`);
  const answer = await ask("api/labels/unlabel", {frame_id: entry.frame_id, camera: entry.camera});
  if (answer.ok) setStatus("#learned-status", `${entry.camera}/${entry.frame_id}: ${learnedText(answer) || "label cleared"}`);
  else {
    setStatus("#learned-status", `${failedHow(answer, "not undone")}: ${answer.error?.message || "error"}`, true);
    button.disabled = false;
  }
  loadLearned();
}

function renderCapture(capture) {
  const rows = Object.entries(capture || {}).sort(([a], [b]) => (a < b ? -1 : 1)).map(([cam, c]) => {
    const tr = document.createElement("tr");
    tr.dataset.camera = cam;
    for (const v of [cam, c.seen, c.kept, c.mb ?? "–", c.false_alarms]) {
      const td = document.createElement("td"); td.textContent = String(v); tr.append(td);
    }
    return tr;
  });
  $("#capture-rows").replaceChildren(...rows);
}

// The export shown: its folder, else (refused) the time of the worker's answer; the worker's stats then show only a
// newer one (an export whose answer this page's wait did not get, or another operator's).
let exportShown = null;

function showExport(answer, lead = "") {
  const status = $("#capture-status"), train = $("#capture-train");
  exportShown = answer.folder || answer.at || null;
  if (!answer.ok) {
    delete status.dataset.folder;
    train.hidden = true;
    setStatus("#capture-status", `${lead}not exported: ${answer.error?.message || "error"}`, true);
    return;
  }
  const what = Object.entries(answer.cameras).map(([c, w]) => `${c}: ${w.normal} normal, ${w.false_alarms} false alarms`);
  setStatus("#capture-status", `${lead}written to ${answer.folder} (${what.join("; ")})`);
  status.dataset.folder = answer.folder;
  train.textContent = Object.values(answer.train).join("\n");
  train.hidden = false;
}

async function exportCapture(event) {
  event.preventDefault();
  const cam = $("#cap-camera").value;
  setStatus("#capture-status", "exporting…");
  delete $("#capture-status").dataset.folder;
  $("#capture-train").hidden = true;
  const answer = await ask("api/capture/export", cam ? {camera: cam} : {});
  if (answer.error?.code === "no_answer") {  // the console's wait ran out; the export goes on: its stats say the end
    setStatus("#capture-status", "still exporting on the worker: the result shows here when it is done");
    return;
  }
  if (NOT_SENT.has(answer.error?.code)) {
    setStatus("#capture-status", `not sent: ${answer.error.message}`, true);
    return;
  }
  showExport(answer);
}

// The worker's capture_export stats: an export running (asked from anywhere), or a last one this page has not shown.
function renderExport(state) {
  if (!state) return;
  if (state.running) {
    const what = state.running.camera ? `camera ${state.running.camera}` : "every camera";
    setStatus("#capture-status", `exporting on the worker (${what}, since ${fmtTime(state.running.since)})…`);
  } else if (state.last && (state.last.folder || state.last.at) !== exportShown) {
    showExport(state.last, `last export (${fmtTime(state.last.at)}): `);
  }
}

function renderModels(model) {
  const scopes = Object.entries(model?.scopes || {}).sort(([a], [b]) => (a === "default" ? -1 : b === "default" ? 1 : a < b ? -1 : 1));
  $("#model-rows").replaceChildren(...scopes.map(([scope, m]) => {
    const tr = document.createElement("tr");
    tr.dataset.scope = scope;
    const ext = m.extension ? `${m.extension.rows}/${m.extension.max_rows}` : "–";
    for (const v of [scope, m.name, m.version, m.precision, ext, m.bundle]) {
      const td = document.createElement("td"); td.textContent = v ?? ""; tr.append(td);
    }
    return tr;
  }));
  const input = $("#m-bundle");
  if (!input.value && !input.dataset.touched && model?.scopes?.default?.bundle) input.value = model.scopes.default.bundle;
}

async function modelCommand(kind) {
  const bundle = $("#m-bundle").value.trim(), cam = $("#m-camera").value;
  if (kind !== "rollback" && !bundle) { setStatus("#model-status", "enter the bundle folder (a path on the worker's box)", true); return; }
  if (kind === "canary" && !cam) { setStatus("#model-status", "pick the camera for the canary", true); return; }
  const scope = kind === "rollout" || !cam ? "default" : cam;
  const body = kind === "rollback" ? (cam ? {camera: cam} : {}) : {bundle, ...(kind === "canary" ? {camera: cam} : {})};
  setStatus("#model-status", kind === "rollback" ? `rolling back ${scope}…` : `loading ${bundle} on ${scope}…`);
  const answer = await ask(kind === "rollback" ? "api/models/rollback" : "api/models/reload", body);
  if (!answer.ok) {  // a 504 (no worker answered) is not a refusal: the command may still be carried out
    const how = answer.error?.code === "no_answer" ? "no answer" : failedHow(answer);
    setStatus("#model-status", `${how}: ${answer.error?.message || "error"}`, true);
    return;
  }
  const own = answer.models?.[scope], m = own || answer.models?.default || {};  // a dropped canary: the default's
  const what = kind === "rollback" ? (own ? "back on" : "back on the default's") : "now runs";
  setStatus("#model-status", `${scope} ${what} ${m.name || "?"} ${m.version || ""}${answer.untaught ? `; ${answer.untaught.message}` : ""}`);
}

// ---- workers, errors, feed ------------------------------------------------------------------
function renderWorker(w) {
  let el = pills.get(w.id);
  if (el) pills.delete(w.id);
  else {
    el = document.createElement("span");
    el.id = `worker-${w.id}`;
    el.className = "pill";
    $("#workers").append(el);
    if (pills.size >= maxWorkers) {
      const [quiet, old] = pills.entries().next().value;
      old.remove();
      pills.delete(quiet);
      modelSeen.delete(quiet);
    }
  }
  pills.set(w.id, el);  // the most recently updated last
  const stats = w.stats || {};
  const twin = stats.other_process;  // a second process runs under this worker.id (worker/presence.py)
  el.className = `pill ${w.availability === "online" && !twin ? "on" : "off"}`;
  // A worker that said it is away (offline, stopped) has no queue or frame rate: its last stats' are stale. One
  // whose availability is not known yet (a broker without retain) is shown by its stats.
  const away = w.availability != null && w.availability !== "online";
  el.textContent = `${w.id}: ${w.availability || "?"}` + (w.model ? ` · ${modelText(w.model)}` : "")
    + (!away && stats.queue !== undefined ? ` · queue ${stats.queue}` : "")
    + (twin ? ` · also running on ${twin.host} (pid ${twin.pid}): give each worker its own worker.id` : "");
  if (w.id === controlled) {
    // the worker back (or seen for the first time): what it learned is asked again, a failed listing replaced
    if (w.availability === "online" && controlledWas !== "online") loadLearned();
    controlledWas = w.availability;
    renderCapture(stats.capture);
    renderExport(stats.capture_export);
    renderModels(w.model);
  }
  // a held label withdrawn (elsewhere: the CLI, another console) moves no revision, only the count held
  const seen = JSON.stringify(Object.entries(w.model?.scopes || {}).map(([s, m]) => [s, m.version, m.extension?.revision,
    m.extension?.held]));
  if (w.model && modelSeen.has(w.id) && modelSeen.get(w.id) !== seen) loadLearned();
  modelSeen.set(w.id, seen);
  for (const [name, c] of Object.entries(stats.cameras || {})) {  // tiles come from results: none made here
    const cam = cams.get(name);
    if (!cam) continue;
    const rate = away ? undefined : w.rates?.[name];
    $(".rate", cam.el).textContent = `${rate !== undefined ? rate.toFixed(1) : "–"} frames/s · received ${c.received}`
      + ` · anomalous ${c.anomalous} · dropped ${c.dropped} · errors ${c.errored}`;
  }
}

// Tiles come from results only: an error message (anyone may publish one, for any camera name) makes none. It is
// kept for a tile that comes later, for as many cameras as the console keeps errors of.
const lastErrors = new Map();

function renderError(e) {
  lastErrors.delete(e.camera);
  lastErrors.set(e.camera, e);
  while (lastErrors.size > maxCameras) lastErrors.delete(lastErrors.keys().next().value);
  const cam = cams.get(e.camera);
  if (cam) showError(cam, e);
}

function showError(cam, e) {
  $(".errs", cam.el).textContent = `last error: ${(e.last || {}).code} (${e.count} seen)`;
}

// The feed's query for the filters shown: the camera and the time window.
function feedParams() {
  const since = $("#feed-since").value;
  const params = new URLSearchParams({limit: FEED_MAX});
  if ($("#feed-camera").value) params.set("camera", $("#feed-camera").value);
  if (since) params.set("since", String(consoleNow() - Number(since)));
  return params;
}

// Whether the console listed it. Where not, the list is emptied and says why: the earlier listing, kept, read as the
// filter's now chosen (another camera's defects under "cam-a"). "Load older" then lists the newest with the filters.
async function loadFeed() {
  const seq = ++feedSeq;
  feedArrived = [];
  const answer = await ask(`api/defects?${feedParams()}`);
  if (seq !== feedSeq) return true;
  if (!answer.ok) {
    feedPending = [];
    $("#defects").replaceChildren();
    $("#feed-more").hidden = false;
    $("#feed-status").textContent = `not listed: ${answer.error?.message || "error"}`;
    return false;
  }
  feedPending = feedArrived.filter(feedMatches);
  feedOverflow = false;  // the answer says whether older ones exist
  feedLimit = FEED_MAX;
  $("#defects").replaceChildren(...answer.frames.map((r) => card(r)));
  $("#feed-more").hidden = !answer.more;
  $("#feed-status").textContent = "";
  return true;
}

// The next FEED_MAX items after the last one listed, as the console lists them: an operator can look further back
// than the newest FEED_MAX (as far as console.history).
async function loadOlder() {
  const list = $("#defects"), last = list.lastElementChild, seq = feedSeq;
  const params = feedParams();
  if (last) { params.set("before_camera", last.dataset.camera); params.set("before_frame_id", last.dataset.frameId); }
  const answer = await ask(`api/defects?${params}`);
  if (seq !== feedSeq) return;  // the filters changed meanwhile: the feed was listed anew
  if (!answer.ok) { $("#feed-status").textContent = `not loaded: ${answer.error?.message || "error"}`; return; }
  const listed = new Set([...list.children].map((li) => li.dataset.key));
  const older = answer.frames.filter((r) => !listed.has(keyOf(r.camera, r.frame_id)));
  list.append(...older.map((r) => card(r)));
  feedLimit = Math.max(feedLimit, list.children.length);
  $("#feed-more").hidden = !answer.more;
  $("#feed-status").textContent = "";
}

function setLink(ok, text, why = "server-sent events from the console") {
  const el = $("#link");
  el.className = `pill ${ok ? "on" : "off"}`;
  el.textContent = text;
  el.title = why;
}

// Why the console refused a stream the browser gave up on (EventSource tells no status): 503 too_many_streams names
// the cap reached, and that a page must close; anything else (a proxy's 502 while the console restarts) is null.
async function refusal() {
  try {
    const res = await fetch("api/events");
    if (res.ok) { res.body.cancel(); return null; }  // taken now: the stream is opened again by connect()
    const answer = await res.json();
    return answer.error?.code === "too_many_streams" ? answer.error.message : null;
  } catch {
    return null;
  }
}

// The console's MQTT link, as its state and its "link" events say: "refused" only when the broker answered the
// login with a refusal (a problem's words such as "Connection refused" are a broker not reached).
function setBroker(ok, problem, refused) {
  const el = $("#broker");
  el.className = `pill ${ok ? "on" : "off"}`;
  el.textContent = ok ? "broker connected" : refused ? "broker refused the console" : "broker unreachable";
  el.title = ok ? "console's MQTT connection" : problem || "console's MQTT connection: not connected yet";
}

// The console's state: at the start, and again after the event stream reconnects (what came while it was down was
// pushed to nobody). A tile the stream has already moved past the state's is kept.
async function loadState() {
  const state = await (await fetch("api/state")).json();
  clockSkew = state.now - Date.now() / 1000;
  seriesSeconds = state.series_minutes * 60;
  maxCameras = state.max_cameras;
  maxWorkers = state.max_workers;
  setBroker(state.broker, state.broker_problem, state.broker_refused);
  controlled = state.worker;
  for (const [name, points] of Object.entries(state.series)) camera(name).points = points;
  for (const r of Object.values(state.cameras)) {
    const cam = camera(r.camera);
    if (!cam.latest || !(cam.latest.seen_at > r.seen_at)) { cam.latest = r; cam.dirty = true; }
  }
  for (const w of Object.values(state.workers)) renderWorker(w);
  for (const [name, e] of Object.entries(state.errors)) renderError({camera: name, ...e});
  schedule();
}

// Not read yet, or the event stream was down: what came meanwhile was pushed to nobody. The page reads the state, the
// feed and the Learned panel once its stream is open, so what comes while they are read arrives on it: read before
// the stream opened, a defect that came in between was in neither.
let streamLost = true;

async function reload() {
  try {
    await loadState();  // first: the console's bounds and clock, which the feed's listing reckons with
    if (!await loadFeed()) throw new Error("the feed was not listed");
  } catch {  // not answered (the console restarting behind a proxy, past console.max_connections): asked again
    setTimeout(reload, RECONNECT_MS);
    return;
  }
  loadLearned();
}

// The event stream. The browser reconnects by itself after a network error, but gives up for good on an answer that is
// no stream (503 too_many_streams, a proxy's 502 while the console restarts): the page then opens a new one itself.
function connect() {
  const events = new EventSource("api/events");
  events.onopen = () => {
    setLink(true, "live");
    if (streamLost) { streamLost = false; reload(); }
  };
  events.onerror = () => {
    streamLost = true;
    setLink(false, "reconnecting…");
    if (events.readyState !== EventSource.CLOSED) return;
    // "reconnecting…" alone read as a network fault where the console turned a page too many away
    refusal().then((why) => {
      if (why) setLink(false, "refused: too many pages open", why);
      setTimeout(connect, RECONNECT_MS);
    });
  };
  events.addEventListener("frame", (e) => onFrame(JSON.parse(e.data)));
  events.addEventListener("thumbnail", (e) => onThumbnail(JSON.parse(e.data)));
  events.addEventListener("feed", loadFeed);  // the defects logged before the console started, behind the live ones
  events.addEventListener("worker", (e) => renderWorker(JSON.parse(e.data)));
  events.addEventListener("camera_error", (e) => renderError(JSON.parse(e.data)));
  events.addEventListener("label", (e) => { applyLabel(JSON.parse(e.data)); loadLearned(); });
  for (const kind of ["ping", "link"]) {  // "link": the console's MQTT link came or went
    events.addEventListener(kind, (e) => { const p = JSON.parse(e.data); setBroker(p.broker, p.broker_problem, p.broker_refused); });
  }
}

function start() {
  connect();
  // plots scroll with time even when a camera is quiet, and the feed's time window with them; when the day turns, the
  // tiles' capture times are written again (a quiet camera's "08:00:00" of yesterday read as today's)
  let day = new Date().toDateString();
  setInterval(() => {
    feedExpire = true;
    if (new Date().toDateString() !== day) {
      day = new Date().toDateString();
      for (const cam of cams.values()) if (cam.latest) cam.dirty = true;
    }
    schedule();
  }, PLOT_EVERY_MS);
}

$("#feed-filter").addEventListener("change", loadFeed);
$("#feed-older").addEventListener("click", loadOlder);
$("#query-filter").addEventListener("submit", search);
$("#overlay").addEventListener("input", (e) => {
  overlay = Number(e.target.value);
  for (const cam of cams.values()) if (cam.latest) cam.dirty = true;
  schedule();
});
$("#capture-form").addEventListener("submit", exportCapture);
$("#m-bundle").addEventListener("input", (e) => { e.target.dataset.touched = "1"; });
$("#m-canary").addEventListener("click", () => modelCommand("canary"));
$("#m-rollout").addEventListener("click", () => modelCommand("rollout"));
$("#m-rollback").addEventListener("click", () => modelCommand("rollback"));
$("#upload-btn").addEventListener("click", () => $("#upload").click());
$("#upload").addEventListener("change", (e) => {
  const file = e.target.files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => openSimilar({image_b64: String(reader.result).split(",", 2)[1], name: file.name});
  reader.readAsDataURL(file);
  e.target.value = "";
});
start();
