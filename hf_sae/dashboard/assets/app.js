// hf_sae feature browser. No dependencies, no network: data files under data/ are scripts that call
// HFSAE_DATA([kind, key, payload]) and are loaded lazily with <script> tags (fetch() is blocked on file://).
"use strict";

const store = { meta: null, index: null, texts: null, autointerp: null, shards: {} };
const pending = {};

function HFSAE_DATA(item) {
  const [kind, key, payload] = item;
  if (kind === "shard") store.shards[key] = payload; else store[kind] = payload;
}
window.HFSAE_DATA = HFSAE_DATA;

function loadScript(src) {
  if (!pending[src]) {
    pending[src] = new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = src;
      s.onload = () => resolve();
      s.onerror = () => reject(new Error("could not load " + src));
      document.head.appendChild(s);
    });
  }
  return pending[src];
}

const pad4 = (i) => String(i).padStart(4, "0");
async function shardOf(id) {
  const s = Math.floor(id / store.meta.shard_size);
  await loadScript("data/latents_" + pad4(s) + ".js");
  return store.shards[s];
}

// ------------------------------------------------------------------ small DOM helpers
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}
function fmt(x, d) {
  if (x === null || x === undefined) return "–";
  if (x !== 0 && Math.abs(x) < 1e-3) return x.toExponential(1);
  return Number(x).toFixed(d === undefined ? 3 : d);
}
function showTok(s) { return s.replace(/\n/g, "↵").replace(/\t/g, "→"); }
function heat(frac) { // 0..1 -> background colour
  const a = Math.max(0, Math.min(1, frac));
  return a > 0 ? "rgba(255, 120, 0, " + (0.15 + 0.85 * a).toFixed(3) + ")" : "transparent";
}

// ------------------------------------------------------------------ index view
const view = { q: "", minD: "", maxD: "", sort: "density", desc: true, page: 0, per: 50 };
const COLS = [["id", "latent", true], ["density", "density", true], ["mean", "mean act.", true], ["max", "max act.", true],
              ["top_tokens", "top-activating tokens", false], ["promoted", "promoted tokens", false],
              ["explanation", "explanation", false], ["score", "score", true]];

function indexRows() {
  const c = store.index.columns;
  const ai = store.autointerp ? store.autointerp.latents || {} : {};
  return store.index.rows.map((r) => {
    const o = {};
    c.forEach((name, i) => { o[name] = r[i]; });
    const a = ai[o.id];
    o.explanation = a ? a.explanation : (o.n2g ? "n-grams: " + o.n2g : "");
    o.score = a && a.detection_accuracy !== undefined ? a.detection_accuracy : o.n2g_f1;
    o.hay = (o.top_tokens + " " + o.promoted + " " + o.n2g + " " + (a ? a.explanation : "")).toLowerCase();
    return o;
  });
}

function renderIndex() {
  const main = document.getElementById("main");
  main.replaceChildren();
  const rows = indexRows();
  const search = el("input", { type: "search", id: "search", placeholder: "search tokens or explanations", value: view.q });
  const minD = el("input", { type: "number", id: "min-density", step: "any", placeholder: "min", value: view.minD });
  const maxD = el("input", { type: "number", id: "max-density", step: "any", placeholder: "max", value: view.maxD });
  const update = () => { view.q = search.value; view.minD = minD.value; view.maxD = maxD.value; view.page = 0; drawTable(); };
  search.addEventListener("input", update); minD.addEventListener("input", update); maxD.addEventListener("input", update);
  const m = store.meta;
  main.append(el("p", { class: "stats" },
    el("span", { text: m.n_latents + " latents" }), el("span", { text: m.n_tokens + " tokens of " + m.dataset + "/" + m.split }),
    el("span", { text: "hook point " + m.hook_point }), el("span", { text: m.activation + (m.k ? " k=" + m.k : "") })));
  main.append(el("div", { class: "controls" }, search, el("label", { text: "density " }, minD, " – ", maxD),
    el("span", { class: "muted hint", text: "density = fraction of tokens where the latent fires; click a column to sort" })));
  const table = el("table", { id: "latents" });
  const head = el("tr");
  for (const [key, label] of COLS) {
    const th = el("th", { text: label, "data-key": key });
    if (view.sort === key) th.className = view.desc ? "sorted-desc" : "sorted-asc";
    th.addEventListener("click", () => {
      if (view.sort === key) view.desc = !view.desc; else { view.sort = key; view.desc = true; }
      renderIndex();
    });
    head.append(th);
  }
  table.append(el("thead", {}, head));
  const body = el("tbody");
  table.append(body);
  const pager = el("div", { class: "pager" });
  main.append(pager, table);

  function drawTable() {
    const q = view.q.trim().toLowerCase();
    const lo = view.minD === "" ? -Infinity : Number(view.minD), hi = view.maxD === "" ? Infinity : Number(view.maxD);
    let sel = rows.filter((o) => (!q || o.hay.includes(q)) && o.density >= lo && o.density <= hi);
    const k = view.sort, sgn = view.desc ? -1 : 1;
    sel.sort((a, b) => {
      const x = a[k], y = b[k];
      if (x === y) return a.id - b.id;
      if (x === null || x === undefined || x === "") return 1;
      if (y === null || y === undefined || y === "") return -1;
      return (x < y ? -1 : 1) * sgn;
    });
    const pages = Math.max(1, Math.ceil(sel.length / view.per));
    view.page = Math.min(view.page, pages - 1);
    const part = sel.slice(view.page * view.per, (view.page + 1) * view.per);
    body.replaceChildren(...part.map((o) => el("tr", { class: "latent-row", "data-id": o.id },
      el("td", { class: "num" }, el("a", { href: "#latent/" + o.id, text: String(o.id) })),
      el("td", { class: "num", text: fmt(o.density, 5) }), el("td", { class: "num", text: fmt(o.mean, 2) }),
      el("td", { class: "num", text: fmt(o.max, 2) }), el("td", { class: "toks", text: showTok(o.top_tokens) }),
      el("td", { text: showTok(o.promoted) }), el("td", { text: o.explanation }),
      el("td", { class: "num", text: fmt(o.score, 2) }))));
    pager.replaceChildren(
      el("button", { id: "prev", text: "◀ prev", onclick: () => { if (view.page > 0) { view.page--; drawTable(); } } }),
      el("span", { id: "page-info", text: "page " + (view.page + 1) + " / " + pages + " (" + sel.length + " latents match)" }),
      el("button", { id: "next", text: "next ▶", onclick: () => { if (view.page < pages - 1) { view.page++; drawTable(); } } }));
  }
  drawTable();
}

// ------------------------------------------------------------------ latent view
function contextLine(ctx, tok, label) {
  const line = el("div", { class: "ctx" }, el("span", { class: "act", text: label }));
  ctx.t.forEach((ti, j) => {
    const v = ctx.v[j] / 100;
    const span = el("span", { class: "tok" + (v > 0 ? " hot" : "") + (j === ctx.c ? " centre" : ""), text: showTok(tok[ti]),
                              title: "activation " + fmt(v * 100) + "% of max" });
    span.style.background = heat(v);
    line.append(span);
  });
  return line;
}

function histogram(counts, edges) {
  const W = 360, H = 90, n = counts.length, mx = Math.max(1, ...counts);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H + 16); svg.setAttribute("class", "hist");
  counts.forEach((c, i) => {
    const r = document.createElementNS(ns, "rect");
    const h = (H * c) / mx;
    r.setAttribute("x", (i * W) / n); r.setAttribute("y", H - h); r.setAttribute("width", Math.max(1, W / n - 1));
    r.setAttribute("height", h); r.setAttribute("fill", "#e07000");
    const t = document.createElementNS(ns, "title");
    t.textContent = (i === 0 ? "< " + edges[0] : i === n - 1 ? "> " + edges[n - 2] : edges[i - 1] + " – " + edges[i]) + ": " + c;
    r.append(t); svg.append(r);
  });
  const lab = document.createElementNS(ns, "text");
  lab.setAttribute("x", 0); lab.setAttribute("y", H + 13); lab.setAttribute("font-size", "10");
  lab.textContent = "activation (log scale, " + edges[0] + " … " + edges[edges.length - 1] + ")";
  svg.append(lab);
  return svg;
}

async function renderLatent(id) {
  const main = document.getElementById("main");
  main.replaceChildren(el("p", { class: "muted", text: "Loading latent " + id + "…" }));
  if (!(id >= 0 && id < store.meta.n_latents)) {
    main.replaceChildren(el("p", { text: "No latent " + id + " (this SAE has " + store.meta.n_latents + ")." }));
    return;
  }
  const shard = await shardOf(id);
  const L = shard.latents[id - Math.floor(id / store.meta.shard_size) * store.meta.shard_size];
  const tok = shard.tok;
  const ai = store.autointerp && store.autointerp.latents ? store.autointerp.latents[id] : null;
  const nav = el("p", {}, id > 0 ? el("a", { href: "#latent/" + (id - 1), text: "◀ " + (id - 1) }) : null, " ",
    el("a", { href: "#", text: "all latents" }), " ",
    id < store.meta.n_latents - 1 ? el("a", { href: "#latent/" + (id + 1), text: (id + 1) + " ▶" }) : null);
  const head = el("h2", { id: "latent-title", text: "Latent " + id });
  const stats = el("p", { class: "stats" },
    el("span", { text: "density " + fmt(L.density, 5) + " (" + L.count + " of " + store.meta.n_tokens + " tokens)" }),
    el("span", { text: "mean when firing " + fmt(L.mean, 3) }), el("span", { text: "max " + fmt(L.max, 3) }));
  const expl = el("div", { class: "card", id: "explanations" }, el("h3", { text: "Explanations" }));
  if (ai) {
    expl.append(el("p", { id: "autointerp-explanation" }, el("b", { text: "LM: " }), ai.explanation));
    expl.append(el("p", { class: "muted", text: "detection accuracy " + fmt(ai.detection_accuracy, 2) + ", AUROC " +
      fmt(ai.detection_auroc, 2) + ", fuzzing accuracy " + fmt(ai.fuzzing_accuracy, 2) + " (" + (store.autointerp.backend || "") + ")" }));
  }
  if (L.n2g) {
    expl.append(el("p", {}, el("b", { text: "N2G n-grams: " }),
      L.n2g.patterns.map((p) => JSON.stringify(p.text)).join(", ")));
    expl.append(el("p", { class: "muted", text: "held-out precision " + fmt(L.n2g.precision, 2) + ", recall " +
      fmt(L.n2g.recall, 2) + ", F1 " + fmt(L.n2g.f1, 2) }));
  }
  if (!ai && !L.n2g) expl.append(el("p", { class: "muted", text: "none (run hf-sae autointerp for LM explanations)" }));
  const top = el("div", { class: "card", id: "top-contexts" }, el("h3", { text: "Top activations" }));
  if (!L.top.length) top.append(el("p", { class: "muted", text: "never fired on these tokens (dead here)" }));
  L.top.forEach((c) => top.append(contextLine(c, tok, fmt(c.a, 2))));
  const samp = el("div", { class: "card", id: "samples" }, el("h3", { text: "Random firing tokens, by activation quantile" }));
  L.samples.forEach((c, i) => samp.append(contextLine(c, tok, "q" + Math.round(100 * (1 - (i + 0.5) / L.samples.length)) + " " + fmt(c.a, 2))));
  const hist = el("div", { class: "card" }, el("h3", { text: "Activation histogram" }), histogram(L.hist, store.meta.hist_edges));
  const toks = (list, cls) => el("div", { class: "toklist" }, ...(list || []).map(([t, v]) => el("span", { class: cls, text: showTok(tok[t]) + " " + fmt(v, 2) })));
  const logits = el("div", { class: "card", id: "logits" }, el("h3", { text: "Output tokens (decoder row → final norm → unembedding)" }),
    el("p", { text: "promoted" }), toks(L.pos, "pos"), el("p", { text: "suppressed" }), toks(L.neg, "neg"));
  const near = el("div", { class: "card", id: "near" }, el("h3", { text: "Nearest latents (decoder cosine)" }),
    el("div", {}, ...(L.near || []).map(([j, c]) => el("span", {}, el("a", { href: "#latent/" + j, text: String(j) }), " " + fmt(c, 2) + "  "))));
  main.replaceChildren(nav, head, stats, el("div", { class: "grid" }, expl, hist, logits, near), top, samp);
}

// ------------------------------------------------------------------ texts view
async function renderTexts() {
  const main = document.getElementById("main");
  main.replaceChildren(el("h2", { text: "Which latents fire on this text" }),
    el("p", { class: "muted", text: "Texts chosen when the site was built. Hover a token for its strongest latents; click to list them." }));
  if (!store.texts) await loadScript("data/texts.js");
  const detail = el("div", { class: "card", id: "token-detail" }, el("p", { class: "muted", text: "click a token" }));
  store.texts.forEach((t, ti) => {
    const box = el("div", { class: "card textview ctx", "data-text": ti });
    const mx = Math.max(1e-9, ...t.latents.map((l) => (l.length ? l[0][1] : 0)));
    t.tokens.forEach((s, j) => {
      const lat = t.latents[j];
      const span = el("span", { class: "tok", text: showTok(s), title: lat.map(([a, v]) => a + ": " + fmt(v, 2)).join("\n") });
      span.style.background = heat(lat.length ? lat[0][1] / mx : 0);
      span.addEventListener("click", () => detail.replaceChildren(el("p", { text: "token " + JSON.stringify(s) }),
        ...lat.map(([a, v]) => el("div", {}, el("a", { href: "#latent/" + a, text: "latent " + a }), " " + fmt(v, 3)))));
      box.append(span);
    });
    main.append(box);
  });
  main.append(detail);
}

// ------------------------------------------------------------------ router
async function route() {
  const h = location.hash.replace(/^#/, "");
  try {
    if (h.startsWith("latent/")) await renderLatent(parseInt(h.slice(7), 10));
    else if (h === "texts") await renderTexts();
    else renderIndex();
  } catch (e) {
    document.getElementById("main").replaceChildren(el("p", { text: "Error: " + e.message }));
    throw e;
  }
}

async function start() {
  await loadScript("data/meta.js");
  await loadScript("data/index.js");
  if (store.meta.autointerp) await loadScript("data/autointerp.js");
  document.getElementById("title").textContent = store.meta.title;
  document.title = "hf_sae: " + store.meta.title;
  window.addEventListener("hashchange", () => { route(); window.scrollTo(0, 0); });
  await route();
  document.body.setAttribute("data-ready", "1");
}
start();
