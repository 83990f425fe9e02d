// normdrop playground: the page. It sends settings and controls over the WebSocket and draws the frames the
// server trains and measures. Every chart is drawn by hand on a <canvas>; nothing is fetched from anywhere else.
"use strict";

const NETWORK_COLORS = ["#1f6fb4", "#e0601a", "#2e9a3e", "#7a52b3"];
const CLASS_COLORS = [[245, 147, 34], [8, 119, 189], [46, 154, 62], [150, 80, 180]];
const LABELS = "ABCD";
const MAX_POINTS = 600; // history kept per chart; beyond it every other point is dropped (memory stays bounded)
const SEND_EVERY_MS = 100; // a slider being dragged sends at most this often
const DEFAULT_NETWORK = {
  norm: "none", norm_position: "before_act", ghost_batch_size: 8, dropout: 0, dropout_position: "after_norm",
  lr: 0.01, optimizer: "adam", init: "default",
};
const DEFAULT_SETTINGS = {
  dataset: "spirals", noise: 0.1, train_size: 200, depth: 4, width: 16, activation: "relu", batch_size: 32,
  seed: 0, grid: 40, networks: [{ ...DEFAULT_NETWORK }, { ...DEFAULT_NETWORK, norm: "batch" }],
};
const GLOBAL_FIELDS = { dataset: "str", noise: "num", train_size: "int", depth: "int", width: "int",
  activation: "str", batch_size: "int", seed: "int", grid: "int" };
const NETWORK_FIELDS = { norm: "str", norm_position: "str", ghost_batch_size: "int", dropout: "num",
  dropout_position: "str", lr: "num", optimizer: "str", init: "str" };

const $ = (id) => document.getElementById(id);

// What the browser test (and a curious learner, in the console) can read.
const playground = {
  settings: null, settingsId: 0, acceptedId: -1, setup: null, frame: null, history: [],
  framesReceived: 0, framesDrawn: 0, playing: false, errors: [],
};
window.playground = playground;

// ---------------------------------------------------------------------------------------------------------------
// Settings: the UI state, the URL hash and the messages all hold the same object.

function clean(raw) {
  // Keep only known fields, of the right type; everything else falls back to the defaults (the server validates).
  const out = { ...DEFAULT_SETTINGS };
  const cast = (kind, value) => (kind === "str" ? String(value) : kind === "int" ? Math.round(Number(value)) : Number(value));
  if (raw && typeof raw === "object") {
    for (const [key, kind] of Object.entries(GLOBAL_FIELDS)) if (key in raw) out[key] = cast(kind, raw[key]);
    if (Array.isArray(raw.networks) && raw.networks.length >= 1) {
      out.networks = raw.networks.slice(0, 4).map((net) => {
        const n = { ...DEFAULT_NETWORK };
        for (const [key, kind] of Object.entries(NETWORK_FIELDS)) if (net && key in net) n[key] = cast(kind, net[key]);
        return n;
      });
    }
  }
  out.networks = out.networks.map((n) => ({ ...n }));
  return out;
}

function settingsFromHash() {
  if (location.hash.length < 2) return clean(null);
  try {
    return clean(JSON.parse(decodeURIComponent(location.hash.slice(1))));
  } catch (_error) {
    return clean(null);
  }
}

function writeHash() {
  history.replaceState(null, "", "#" + encodeURIComponent(JSON.stringify(playground.settings)));
}

// ---------------------------------------------------------------------------------------------------------------
// Controls

const fmt = (x, digits = 2) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%");
const lrText = (lr) => (lr >= 0.1 ? lr.toPrecision(2) : lr.toExponential(1));

function showGlobalControls() {
  const s = playground.settings;
  for (const key of Object.keys(GLOBAL_FIELDS)) {
    const el = $(key);
    el.value = String(s[key]);
    const out = $(key + "-value");
    if (out) out.textContent = key === "noise" ? fmt(s[key]) : String(s[key]);
  }
  $("train_size").max = s.dataset === "mnist1d" ? "4000" : "1000";
  const lrAll = Math.log10(s.networks[0].lr);
  $("lr-all").value = String(lrAll);
  $("lr-all-value").textContent = lrText(s.networks[0].lr);
}

function buildNetworkCards() {
  const box = $("network-cards");
  box.textContent = "";
  const template = $("network-card");
  playground.settings.networks.forEach((net, index) => {
    const card = template.content.firstElementChild.cloneNode(true);
    card.dataset.index = String(index);
    card.querySelector(".label").textContent = LABELS[index];
    card.querySelector(".swatch").style.background = NETWORK_COLORS[index];
    const norm = card.querySelector(".norm");
    norm.value = net.norm === "none" ? "none" : `${net.norm}:${net.norm_position}`;
    card.querySelector(".ghost_batch_size").value = String(net.ghost_batch_size);
    card.querySelector(".ghost-row").hidden = net.norm !== "ghost";
    card.querySelector(".dropout").value = String(net.dropout);
    card.querySelector(".dropout-value").textContent = fmt(net.dropout);
    card.querySelector(".dropout_position").value = net.dropout_position;
    card.querySelector(".lr").value = String(Math.log10(net.lr));
    card.querySelector(".lr-value").textContent = lrText(net.lr);
    card.querySelector(".optimizer").value = net.optimizer;
    card.querySelector(".init").value = net.init;
    card.querySelector(".remove").hidden = playground.settings.networks.length <= 1;
    card.addEventListener("input", (event) => onNetworkInput(index, card, event));
    card.addEventListener("change", (event) => onNetworkInput(index, card, event));
    card.querySelector(".remove").addEventListener("click", () => {
      playground.settings.networks.splice(index, 1);
      buildNetworkCards();
      sendSettings(true);
    });
    box.appendChild(card);
  });
  $("add-network").hidden = playground.settings.networks.length >= 4;
}

function onNetworkInput(index, card, event) {
  const net = playground.settings.networks[index];
  const target = event.target;
  if (target.classList.contains("norm")) {
    const [norm, position] = target.value.split(":");
    net.norm = norm;
    if (position) net.norm_position = position;
    card.querySelector(".ghost-row").hidden = net.norm !== "ghost";
  } else if (target.classList.contains("dropout")) {
    net.dropout = Number(target.value);
    card.querySelector(".dropout-value").textContent = fmt(net.dropout);
  } else if (target.classList.contains("lr")) {
    net.lr = Number(Math.pow(10, Number(target.value)).toPrecision(3));
    card.querySelector(".lr-value").textContent = lrText(net.lr);
  } else if (target.classList.contains("ghost_batch_size")) {
    net.ghost_batch_size = Number(target.value);
  } else {
    for (const key of ["dropout_position", "optimizer", "init"]) if (target.classList.contains(key)) net[key] = target.value;
  }
  sendSettings(event.type === "change");
}

function wireGlobalControls() {
  for (const [key, kind] of Object.entries(GLOBAL_FIELDS)) {
    const handler = (event) => {
      const raw = $(key).value;
      playground.settings[key] = kind === "str" ? raw : Number(raw);
      const s = playground.settings;
      if (key === "dataset" && raw !== "mnist1d" && s.train_size > 1000) s.train_size = 1000;
      // A batch cannot be larger than the training set: the batch size follows a shrinking training set down.
      const sizes = [...$("batch_size").options].map((o) => Number(o.value));
      if (s.batch_size > s.train_size) s.batch_size = Math.max(...sizes.filter((b) => b <= s.train_size));
      showGlobalControls();
      sendSettings(event.type === "change");
    };
    $(key).addEventListener("input", handler);
    $(key).addEventListener("change", handler);
  }
  const lrAll = (event) => {
    const lr = Number(Math.pow(10, Number($("lr-all").value)).toPrecision(3));
    for (const net of playground.settings.networks) net.lr = lr;
    $("lr-all-value").textContent = lrText(lr);
    for (const card of document.querySelectorAll("fieldset.network")) {
      card.querySelector(".lr").value = $("lr-all").value;
      card.querySelector(".lr-value").textContent = lrText(lr);
    }
    sendSettings(event.type === "change");
  };
  $("lr-all").addEventListener("input", lrAll);
  $("lr-all").addEventListener("change", lrAll);
  $("add-network").addEventListener("click", () => {
    const nets = playground.settings.networks;
    if (nets.length >= 4) return;
    nets.push({ ...nets[nets.length - 1] });
    buildNetworkCards();
    sendSettings(true);
  });
  $("play").addEventListener("click", () => control(playground.playing ? "pause" : "play"));
  $("step").addEventListener("click", () => control("step"));
  $("reset").addEventListener("click", () => control("reset"));
  document.addEventListener("keydown", (event) => {
    if (event.code === "Space" && !["INPUT", "SELECT", "BUTTON"].includes(document.activeElement.tagName)) {
      event.preventDefault();
      control(playground.playing ? "pause" : "play");
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// The connection

let socket = null;
let sendTimer = null;
let lastSent = 0;

function send(message) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
}

function sendSettings(now) {
  writeHash();
  const wait = SEND_EVERY_MS - (performance.now() - lastSent);
  if (sendTimer) clearTimeout(sendTimer);
  const go = () => {
    sendTimer = null;
    lastSent = performance.now();
    playground.settingsId += 1;
    send({ type: "settings", id: playground.settingsId, settings: playground.settings });
  };
  if (now || wait <= 0) go();
  else sendTimer = setTimeout(go, wait);
}

function control(action) {
  send({ type: "control", action });
}

function showError(text) {
  playground.errors.push(text);
  const box = $("error");
  box.textContent = text;
  box.hidden = false;
}

function connect() {
  const token = new URLSearchParams(location.search).get("token") || "";
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  socket = new WebSocket(`${scheme}//${location.host}/ws?token=${encodeURIComponent(token)}`);
  let heard = false;
  socket.addEventListener("open", () => {
    $("status").textContent = "live";
    $("status").className = "status live";
    sendSettings(true);
    control("play");
  });
  socket.addEventListener("message", (event) => {
    heard = true;
    const message = JSON.parse(event.data);
    if (message.type === "setup") onSetup(message);
    else if (message.type === "frame") onFrame(message);
    else if (message.type === "error") {
      showError("The server refused a message: " + message.message);
      if (!playground.setup) {
        // The settings this page started from (its address) were refused: start from the defaults instead.
        playground.settings = clean(null);
        showGlobalControls();
        buildNetworkCards();
        sendSettings(true);
      }
    }
  });
  socket.addEventListener("close", () => {
    $("status").className = "status closed";
    $("status").textContent = heard
      ? "disconnected: the server stopped"
      : "refused: open the exact address that `normdrop playground` printed (it carries this launch's token)";
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Messages

function onSetup(message) {
  playground.setup = message;
  playground.acceptedId = message.settings_id;
  playground.history = [];
  playground.frame = null;
  $("error").hidden = true;
  const depth = message.settings.depth;
  for (const id of ["act-layer", "bn-layer"]) {
    const select = $(id);
    const keep = Math.min(Number(select.value) || 1, depth);
    select.textContent = "";
    for (let i = 1; i <= depth; i++) select.add(new Option(`layer ${i}`, String(i)));
    select.value = String(keep);
  }
  $("no-map").hidden = message.data.two_d;
  const boundaries = $("boundaries");
  const diagrams = $("diagrams");
  boundaries.textContent = "";
  diagrams.textContent = "";
  message.networks.forEach((net, i) => {
    if (message.data.two_d) boundaries.appendChild(figure("boundary", `boundary-${net.label}`, 240, 240, net, i));
    diagrams.appendChild(figure("diagram", `diagram-${net.label}`, 300, 170, net, i));
  });
  $("legend").textContent = "";
  message.networks.forEach((net, i) => {
    const span = document.createElement("span");
    span.style.color = NETWORK_COLORS[i];
    span.textContent = `■ ${net.label}: ${net.description}`;
    $("legend").appendChild(span);
  });
  document.querySelectorAll("fieldset.network").forEach((card, i) => {
    const net = message.networks[i];
    card.querySelector(".description").textContent = net ? net.description : "";
  });
  scheduleDraw();
}

function figure(kind, id, width, height, net, index) {
  const box = document.createElement("div");
  box.className = kind;
  const canvas = document.createElement("canvas");
  canvas.id = id;
  sizeCanvas(canvas, width, height);
  const caption = document.createElement("div");
  caption.className = "caption";
  caption.style.color = NETWORK_COLORS[index];
  caption.textContent = `${net.label}: ${net.description}`;
  box.append(canvas, caption);
  return box;
}

function sizeCanvas(canvas, width, height) {
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  canvas.style.width = width + "px";
  canvas.style.height = height + "px";
}

function onFrame(frame) {
  if (!playground.setup || frame.settings_id !== playground.setup.settings_id) return;
  playground.framesReceived += 1;
  playground.frame = frame;
  playground.playing = frame.playing;
  const h = playground.history;
  if (h.length && frame.step < h[h.length - 1].step) h.length = 0; // a reset
  if (!h.length || frame.step !== h[h.length - 1].step) {
    h.push({
      step: frame.step,
      nets: frame.networks.map((n) => ({
        trainLoss: n.train.loss, testLoss: n.test.loss, trainAcc: n.train.acc, testAcc: n.test.acc,
        acts: n.activations || null, bn: n.bn || null,
      })),
    });
    if (h.length > MAX_POINTS) playground.history = h.filter((_p, i) => i % 2 === 0 || i === h.length - 1);
  }
  $("play").textContent = frame.playing ? "Pause" : "Play";
  $("step-count").textContent = String(frame.step);
  $("steps-per-s").textContent = frame.steps_per_s > 0 ? String(Math.round(frame.steps_per_s)) : "–";
  scheduleDraw();
}

// ---------------------------------------------------------------------------------------------------------------
// Drawing

let drawPending = false;
let fpsMark = { time: performance.now(), drawn: 0 };

function scheduleDraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => {
    drawPending = false;
    draw();
  });
}

function context(canvas) {
  const ctx = canvas.getContext("2d");
  const ratio = canvas.width / parseFloat(canvas.style.width || canvas.width);
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  const width = canvas.width / ratio;
  const height = canvas.height / ratio;
  ctx.clearRect(0, 0, width, height);
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, width, height);
  return { ctx, width, height };
}

// Only the views on screen are drawn (the browser's time goes to what the learner sees); a view scrolled into
// sight is drawn at once.
const visibleViews = new Set();
const viewObserver = new IntersectionObserver((entries) => {
  for (const entry of entries) {
    if (entry.isIntersecting) visibleViews.add(entry.target.id);
    else visibleViews.delete(entry.target.id);
  }
  scheduleDraw();
});

function draw() {
  const setup = playground.setup;
  const frame = playground.frame;
  if (!setup) return;
  const shown = (id) => visibleViews.has(id);
  const netFrame = (i) => (frame ? frame.networks[i] : null);
  if (setup.data.two_d && shown("view-data")) setup.networks.forEach((net, i) => drawBoundary(net, netFrame(i)));
  if (shown("view-curves")) drawCurves();
  if (shown("view-activations")) drawActivations();
  if (shown("view-bn")) drawBN(frame);
  if (shown("view-dropout")) {
    setup.networks.forEach((net, i) => drawDiagram(net, i, netFrame(i)));
    drawMC(frame);
  }
  if (shown("view-shift")) drawShift(frame);
  if (shown("view-lr")) drawLR(frame);
  playground.framesDrawn += 1;
  const now = performance.now();
  if (now - fpsMark.time >= 1000) {
    $("fps").textContent = ((1000 * (playground.framesDrawn - fpsMark.drawn)) / (now - fpsMark.time)).toFixed(0);
    fpsMark = { time: now, drawn: playground.framesDrawn };
  }
}

function decode(base64) {
  const text = atob(base64);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  return bytes;
}

function drawBoundary(net, netFrame) {
  const canvas = $(`boundary-${net.label}`);
  if (!canvas) return;
  const { ctx, width, height } = context(canvas);
  const setup = playground.setup;
  const grid = setup.settings.grid;
  const classes = setup.data.num_classes;
  const extent = setup.data.extent;
  if (netFrame && netFrame.boundary) {
    const probs = decode(netFrame.boundary);
    const image = new ImageData(grid, grid);
    for (let cell = 0; cell < grid * grid; cell++) {
      let r = 0, g = 0, b = 0, top = 0;
      for (let c = 0; c < classes; c++) {
        const p = probs[cell * classes + c] / 255;
        const color = CLASS_COLORS[c % CLASS_COLORS.length];
        r += p * color[0]; g += p * color[1]; b += p * color[2];
        top = Math.max(top, p);
      }
      // Paler where the network is unsure: mix towards white by (1 - confidence above chance).
      const sure = classes > 1 ? Math.max(0, (top - 1 / classes) / (1 - 1 / classes)) : 1;
      const keep = 0.25 + 0.55 * sure;
      image.data[4 * cell] = 255 + keep * (r - 255);
      image.data[4 * cell + 1] = 255 + keep * (g - 255);
      image.data[4 * cell + 2] = 255 + keep * (b - 255);
      image.data[4 * cell + 3] = 255;
    }
    const small = document.createElement("canvas");
    small.width = grid;
    small.height = grid;
    small.getContext("2d").putImageData(image, 0, 0);
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(small, 0, 0, width, height);
  } else if (netFrame && netFrame.diverged_at !== null) {
    ctx.fillStyle = "#b22";
    ctx.font = "14px system-ui, sans-serif";
    ctx.fillText(`diverged at step ${netFrame.diverged_at}`, 12, 22);
  }
  const toX = (x) => ((x + extent) / (2 * extent)) * width;
  const toY = (y) => ((extent - y) / (2 * extent)) * height;
  const dot = (p, filled) => {
    const color = CLASS_COLORS[p[2] % CLASS_COLORS.length];
    ctx.beginPath();
    ctx.arc(toX(p[0]), toY(p[1]), filled ? 2.6 : 2.4, 0, 2 * Math.PI);
    if (filled) {
      ctx.fillStyle = `rgb(${color.join(",")})`;
      ctx.fill();
      ctx.strokeStyle = "#fff";
      ctx.lineWidth = 0.8;
      ctx.stroke();
    } else {
      ctx.strokeStyle = `rgb(${color.map((v) => Math.round(v * 0.7)).join(",")})`;
      ctx.lineWidth = 1;
      ctx.stroke();
    }
  };
  for (const p of setup.data.test) dot(p, false);
  for (const p of setup.data.train) dot(p, true);
}

// A line chart: series of {points: [[x, y], ...], color, width, dash, alpha}; y null makes a gap.
function lineChart(canvas, series, options) {
  const { ctx, width, height } = context(canvas);
  const pad = { left: 44, right: 10, top: 18, bottom: 24 };
  const xs = [], ys = [];
  for (const s of series) for (const [x, y] of s.points) if (y !== null && Number.isFinite(y)) { xs.push(x); ys.push(y); }
  ctx.fillStyle = "#444";
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillText(options.title, pad.left, 12);
  if (!xs.length) return;
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  if (x1 === x0) x1 = x0 + 1;
  let [y0, y1] = options.yRange || [Math.min(...ys), Math.max(...ys)];
  if (options.yCap !== undefined) y1 = Math.min(y1, options.yCap);
  if (options.yFloor !== undefined) y0 = Math.min(y0, options.yFloor);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const X = (x) => pad.left + ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const Y = (y) => pad.top + (1 - (Math.min(Math.max(y, y0), y1) - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);
  ctx.strokeStyle = "#ccc";
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(pad.left, pad.top);
  ctx.lineTo(pad.left, height - pad.bottom);
  ctx.lineTo(width - pad.right, height - pad.bottom);
  ctx.stroke();
  ctx.fillStyle = "#777";
  for (const v of [y0, (y0 + y1) / 2, y1]) ctx.fillText(fmt(v, Math.abs(y1 - y0) < 0.1 ? 3 : 2), 2, Y(v) + 4);
  ctx.fillText(`step ${Math.round(x0)}`, pad.left, height - 6);
  const last = `${Math.round(x1)}`;
  ctx.fillText(last, width - pad.right - ctx.measureText(last).width, height - 6);
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.globalAlpha = s.alpha || 1;
    ctx.lineWidth = s.width || 1.6;
    ctx.setLineDash(s.dash || []);
    ctx.beginPath();
    let open = false;
    for (const [x, y] of s.points) {
      if (y === null || !Number.isFinite(y)) { open = false; continue; }
      if (open) ctx.lineTo(X(x), Y(y)); else ctx.moveTo(X(x), Y(y));
      open = true;
    }
    ctx.stroke();
  }
  ctx.globalAlpha = 1;
  ctx.setLineDash([]);
}

function netSeries(pick, netIndex) {
  return playground.history.map((entry) => [entry.step, entry.nets[netIndex] ? pick(entry.nets[netIndex]) : null]);
}

function drawCurves() {
  const nets = playground.setup.networks;
  const loss = [], acc = [];
  nets.forEach((_net, i) => {
    const color = NETWORK_COLORS[i];
    loss.push({ points: netSeries((n) => n.trainLoss, i), color });
    loss.push({ points: netSeries((n) => n.testLoss, i), color, dash: [5, 4] });
    acc.push({ points: netSeries((n) => n.trainAcc, i), color });
    acc.push({ points: netSeries((n) => n.testAcc, i), color, dash: [5, 4] });
  });
  lineChart($("loss-chart"), loss, { title: "loss (cross-entropy)", yFloor: 0, yCap: 3 });
  lineChart($("acc-chart"), acc, { title: "accuracy", yRange: [0, 1] });
}

function drawActivations() {
  const layer = Number($("act-layer").value || 1) - 1;
  const series = [];
  playground.setup.networks.forEach((_net, i) => {
    const color = NETWORK_COLORS[i];
    [0, 1, 2].forEach((q) => {
      const pick = (n) => (n.acts && n.acts[layer] ? n.acts[layer][q] : null);
      series.push({ points: netSeries(pick, i), color, width: q === 1 ? 2 : 1, alpha: q === 1 ? 1 : 0.55 });
    });
  });
  lineChart($("act-chart"), series, { title: `activation inputs of layer ${layer + 1}: 15th, 50th, 85th percentiles` });
}

// Lines of text built as DOM nodes (the page's Content-Security-Policy refuses inline style attributes).
// A line is a list of parts: a string, or {text, color, bold, cls}.
function setLines(box, lines, empty) {
  box.textContent = "";
  if (!lines.length) {
    box.textContent = empty;
    return;
  }
  lines.forEach((parts, k) => {
    if (k) box.appendChild(document.createElement("br"));
    for (const part of parts) {
      if (typeof part === "string") {
        box.appendChild(document.createTextNode(part));
        continue;
      }
      const el = document.createElement(part.bold ? "b" : "span");
      el.textContent = part.text;
      if (part.color) el.style.color = part.color;
      if (part.cls) el.className = part.cls;
      box.appendChild(el);
    }
  });
}

function drawBN(frame) {
  const layer = Number($("bn-layer").value || 1) - 1;
  const series = [];
  const lines = [];
  playground.setup.networks.forEach((net, i) => {
    if (!net.bn_layers) return;
    const color = NETWORK_COLORS[i];
    const pick = (key) => (n) => (n.bn && n.bn[layer] ? n.bn[layer][key] : null);
    series.push({ points: netSeries(pick("batch_mean"), i), color, width: 1, alpha: 0.6 });
    series.push({ points: netSeries(pick("running_mean"), i), color, width: 2.6 });
    const evalNums = frame && frame.networks[i].bn_eval;
    if (evalNums) {
      lines.push([{ text: net.label, color }, ": test accuracy with running statistics (eval mode) ",
        { text: pct(evalNums.running), bold: true }, ", with each batch's own statistics (train mode) ",
        { text: pct(evalNums.batch), bold: true }]);
    }
  });
  lineChart($("bn-chart"), series, { title: `layer ${layer + 1}, unit 1: batch mean (thin) and running mean (thick)` });
  setLines($("bn-eval"), lines, "No network has BN: switch it on in a network's card.");
}

function drawDiagram(net, index, netFrame) {
  const canvas = $(`diagram-${net.label}`);
  if (!canvas) return;
  const { ctx, width, height } = context(canvas);
  const settings = playground.setup.settings;
  const inputs = playground.setup.data.two_d ? 2 : 40;
  const columns = [inputs, ...Array(settings.depth).fill(settings.width), playground.setup.data.num_classes];
  const masks = netFrame && netFrame.masks ? netFrame.masks : [];
  const perLayer = Array(columns.length).fill(null);
  const position = settings.networks[index].dropout_position;
  if (position === "before_head" && masks.length) perLayer[settings.depth] = masks[0];
  else masks.forEach((mask, i) => { perLayer[i + 1] = mask; });
  const shown = 16;
  const colX = (c) => 20 + (c * (width - 40)) / (columns.length - 1);
  const rowY = (r, n) => 14 + ((r + 0.5) * (height - 28)) / n;
  ctx.strokeStyle = "rgba(0,0,0,0.08)";
  ctx.lineWidth = 0.6;
  ctx.beginPath(); // one path for every connection: one stroke call instead of hundreds
  for (let c = 0; c + 1 < columns.length; c++) {
    const a = Math.min(columns[c], shown), b = Math.min(columns[c + 1], shown);
    for (let i = 0; i < a; i++) for (let j = 0; j < b; j++) {
      ctx.moveTo(colX(c), rowY(i, a));
      ctx.lineTo(colX(c + 1), rowY(j, b));
    }
  }
  ctx.stroke();
  const color = NETWORK_COLORS[index];
  columns.forEach((count, c) => {
    const n = Math.min(count, shown);
    const radius = Math.min(5, (height - 28) / n / 2.4);
    for (let r = 0; r < n; r++) {
      const state = perLayer[c] ? perLayer[c][r] : 1;
      const x = colX(c), y = rowY(r, n);
      ctx.beginPath();
      ctx.arc(x, y, radius, 0, 2 * Math.PI);
      ctx.lineWidth = 1;
      if (state === 0) {
        ctx.fillStyle = "#eee"; ctx.fill(); ctx.strokeStyle = "#999"; ctx.stroke();
        ctx.beginPath();
        ctx.moveTo(x - radius, y - radius); ctx.lineTo(x + radius, y + radius);
        ctx.moveTo(x + radius, y - radius); ctx.lineTo(x - radius, y + radius);
        ctx.strokeStyle = "#c22"; ctx.stroke();
      } else if (state === 2) {
        ctx.fillStyle = "#fff"; ctx.fill(); ctx.strokeStyle = color; ctx.stroke();
      } else {
        ctx.fillStyle = color; ctx.fill();
      }
    }
    if (count > shown) {
      ctx.fillStyle = "#777";
      ctx.font = "10px system-ui, sans-serif";
      ctx.fillText(`${shown} of ${count}`, colX(c) - 16, height - 2);
    }
  });
  if (!net.dropout_layers) {
    ctx.fillStyle = "#777";
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillText("no dropout", 6, 11);
  }
}

function drawMC(frame) {
  const lines = [];
  playground.setup.networks.forEach((net, i) => {
    const mc = frame && frame.networks[i].mc;
    if (!mc) return;
    lines.push([{ text: net.label, color: NETWORK_COLORS[i] }, ": test accuracy with weight scaling ",
      { text: pct(mc.weight_scaling), bold: true }, `, MC average of ${mc.samples} masks `,
      { text: pct(mc.mc), bold: true }]);
  });
  setLines($("mc"), lines, "No network has dropout: move a network's dropout slider.");
}

function drawShift(frame) {
  const canvas = $("shift-chart");
  const { ctx, width, height } = context(canvas);
  ctx.font = "12px system-ui, sans-serif";
  const rows = [];
  if (frame) playground.setup.networks.forEach((net, i) => {
    const shift = frame.networks[i].shift;
    if (shift) shift.forEach((layer, l) => rows.push({ net, i, l, ratio: layer.eval_var > 0 ? layer.running_var / layer.eval_var : null }));
  });
  if (!rows.length) {
    ctx.fillStyle = "#777";
    ctx.fillText("No network has BN: the shift is a BN effect.", 10, 20);
    return;
  }
  const lo = 0.5, hi = 3;
  const left = 130, right = width - 60;
  const X = (r) => left + ((Math.min(Math.max(r, lo), hi) - lo) / (hi - lo)) * (right - left);
  const rowH = Math.min(18, (height - 24) / rows.length);
  rows.forEach((row, k) => {
    const y = 8 + k * rowH;
    ctx.fillStyle = NETWORK_COLORS[row.i];
    ctx.fillText(`${row.net.label}, BN layer ${row.l + 1}`, 6, y + rowH * 0.7);
    if (row.ratio !== null) {
      ctx.globalAlpha = 0.75;
      ctx.fillRect(X(lo), y + 2, X(row.ratio) - X(lo), rowH - 5);
      ctx.globalAlpha = 1;
      ctx.fillStyle = "#333";
      ctx.fillText(`${fmt(row.ratio)}×`, right + 6, y + rowH * 0.7);
    }
  });
  ctx.strokeStyle = "#222";
  ctx.setLineDash([3, 3]);
  ctx.beginPath();
  ctx.moveTo(X(1), 4);
  ctx.lineTo(X(1), height - 16);
  ctx.stroke();
  ctx.setLineDash([]);
  ctx.fillStyle = "#555";
  ctx.fillText("1 (no shift)", X(1) - 24, height - 3);
  ctx.fillText(`${hi}×`, right - 14, height - 3);
}

function drawLR(frame) {
  const lines = [];
  playground.setup.networks.forEach((net, i) => {
    const n = frame && frame.networks[i];
    const lr = playground.setup.settings.networks[i].lr;
    const state = !n ? ["waiting"] : n.diverged_at !== null
      ? [{ text: `diverged at step ${n.diverged_at}`, cls: "diverged" }, " (its loss went above 100 or was not a number)"]
      : [`training: last batch loss ${fmt(n.batch_loss, 3)}, test accuracy ${pct(n.test.acc)}`];
    lines.push([{ text: net.label, color: NETWORK_COLORS[i] }, ` (lr ${lrText(lr)}): `, ...state]);
  });
  setLines($("lr-status"), lines, "");
}

// ---------------------------------------------------------------------------------------------------------------

window.addEventListener("DOMContentLoaded", () => {
  playground.settings = settingsFromHash();
  showGlobalControls();
  buildNetworkCards();
  wireGlobalControls();
  writeHash();
  for (const view of document.querySelectorAll("section.view")) viewObserver.observe(view);
  connect();
});
