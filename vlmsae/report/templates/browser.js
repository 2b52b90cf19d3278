// vlmsae feature browser. Works from file:// with no server: the page data and a search index of every
// card are inline; the cards' numbers and images are inline too for a small browser, else they come from
// chunks/cNNNNN.js script files (a file:// page may load sibling scripts but not request them with the
// fetch API), each calling window.vlmsaeChunk(payload), loaded when a card of theirs scrolls into view.
// Only the cards on screen (plus a margin) are in the DOM. Every string from the data reaches the DOM
// through textContent or a property, never through innerHTML.
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("browser-data").textContent);
  var IDX = DATA.index, N = IDX.latent.length, CHUNK = DATA.chunk_size;
  var cardsEl = document.getElementById("cards");
  var state = { key: "ms", dir: -1, query: "" };
  var chunks = {}, requested = {}, cardCache = {}, cacheSize = 0;
  var order = [], sortedCache = {};
  var MIN_CARD_W = 400, ROW_H = 380, GAP = 12, MARGIN_ROWS = 2;

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function fmt(x, digits) {
    return (x === null || x === undefined) ? "n/a" : Number(x).toFixed(digits === undefined ? 3 : digits);
  }
  function pct(x) {
    if (x === null || x === undefined) return "n/a";
    return x <= 1 ? (100 * x).toPrecision(3) + "%" : String(x);
  }
  function groupColor(g) {
    if (g === null || g === undefined) return "#9ca3af";
    return "hsl(" + ((g * 67 + 210) % 360) + ", 60%, 45%)";
  }

  // Patch heatmap: the grid (ints 0..255) drawn on a tiny canvas that CSS scales up smoothly.
  // A plasma-like ramp (violet -> orange -> yellow) stands out on most images, red shapes included;
  // weak patches stay nearly transparent.
  var RAMP = [[13, 8, 135], [156, 23, 158], [237, 121, 83], [240, 249, 33]];
  function rampColor(v) {
    var x = Math.max(0, Math.min(1, v)) * (RAMP.length - 1), i = Math.min(RAMP.length - 2, Math.floor(x)), f = x - i;
    return [0, 1, 2].map(function (c) { return Math.round(RAMP[i][c] + f * (RAMP[i + 1][c] - RAMP[i][c])); });
  }
  function heatCanvas(heat) {
    var side = Math.round(Math.sqrt(heat.length));
    var c = el("canvas", "heat");
    c.width = side; c.height = side;
    var ctx = c.getContext("2d");
    var img = ctx.createImageData(side, side);
    for (var i = 0; i < heat.length; i++) {
      var v = heat[i] / 255, rgb = rampColor(v);
      img.data[4 * i] = rgb[0];
      img.data[4 * i + 1] = rgb[1];
      img.data[4 * i + 2] = rgb[2];
      img.data[4 * i + 3] = Math.round(190 * Math.sqrt(v));
    }
    ctx.putImageData(img, 0, 0);
    return c;
  }

  function steeringBlock(indices) {
    var d = el("details", "steer");
    d.open = true;
    d.appendChild(el("summary", null, "steering examples (" + indices.length + ")"));
    indices.forEach(function (i) {
      var ex = DATA.steering[i];
      var head = [];
      if (ex.alpha !== null && ex.alpha !== undefined) head.push("alpha = " + JSON.stringify(ex.alpha));
      if (ex.mode) head.push("mode " + ex.mode);
      d.appendChild(el("div", "muted", head.join(" · ")));
      if (ex.prompt) d.appendChild(el("div", null, "Prompt: " + ex.prompt));
      ex.rows.forEach(function (r) {
        if (r.image) d.appendChild(el("div", "muted", "image: " + r.image));
        var row = el("div", "pair");
        row.appendChild(el("div", "baseline", "baseline: " + r.baseline));
        row.appendChild(el("div", "steered", "steered: " + r.steered));
        d.appendChild(row);
        if (r.activation_steering !== null && r.activation_steering !== undefined) {
          d.appendChild(el("div", "muted", "plain activation steering: " + r.activation_steering));
        }
      });
      Object.keys(ex.sweep || {}).forEach(function (a) {
        d.appendChild(el("div", "muted", "alpha " + a + ": " + ex.sweep[a].join(" | ")));
      });
    });
    return d;
  }

  function pad(n, width) {
    var s = String(n);
    while (s.length < width) s = "0" + s;
    return s;
  }
  function decodeHeat(b64) {
    var bin = atob(b64), out = new Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  // Chunks: registered by inline data or by chunks/cNNNNN.js; a card is (chunk payload, offset).
  window.vlmsaeChunk = function (payload) {
    chunks[payload.chunk] = payload;
    renderWindow();
  };
  function requestChunk(c) {
    if (chunks[c] || requested[c]) return;
    requested[c] = true;
    var s = document.createElement("script");
    s.src = "chunks/c" + pad(c, 5) + ".js";
    s.onerror = function () {
      document.getElementById("count").textContent = "could not load " + s.src + " (was the browser folder copied whole?)";
    };
    document.body.appendChild(s);
  }

  function cardHead(pos, card) {
    var group = IDX.group[pos], ms = IDX.ms[pos];
    var head = el("div", "card-head");
    head.appendChild(el("span", "lid", "#" + IDX.latent[pos]));
    var badge = el("span", "badge", group === null || group === undefined ? "no group" : "group " + group);
    badge.style.background = groupColor(group);
    head.appendChild(badge);
    head.appendChild(el("span", "ms", ms === null ? "MS dead" : "MS " + fmt(ms)));
    card.appendChild(head);
    var bar = el("div", "msbar"), fill = el("div");
    fill.style.width = (ms === null ? 0 : Math.max(0, Math.min(1, ms)) * 100) + "%";
    bar.appendChild(fill);
    card.appendChild(bar);
    if (IDX.name[pos]) card.appendChild(el("div", "name", IDX.name[pos]));
  }

  function placeholderCard(pos) {
    var card = el("article", "card loading");
    card.dataset.latent = IDX.latent[pos];
    cardHead(pos, card);
    card.appendChild(el("div", "label", "loading\u2026"));
    return card;
  }

  function buildCard(pos) {
    var payload = chunks[Math.floor(pos / CHUNK)];
    var c = payload.cards[pos % CHUNK], images = payload.images;
    var card = el("article", "card");
    card.dataset.latent = c.latent;
    card.dataset.loaded = "1";
    cardHead(pos, card);
    card.appendChild(el("div", "label", c.label || ""));
    var meta = ["freq " + pct(IDX.freq[pos]), "max act " + fmt(c.max_act, 2)];
    if (c.depth_mean !== null && c.depth_mean !== undefined) meta.push("LCA depth " + fmt(c.depth_mean, 2));
    card.appendChild(el("div", "meta", meta.join(" · ")));
    if (c.names && c.names.length > 1) card.appendChild(el("div", "meta", "also: " + c.names.slice(1).join(", ")));
    var ranks = Object.keys(c.ranks || {});
    if (ranks.length) {
      card.appendChild(el("div", "ranks", ranks.map(function (r) { return r + ": " + c.ranks[r]; }).join(" › ")));
    }
    var thumbs = el("div", "thumbs");
    c.top.forEach(function (t, s) {
      var image = t[0], act = t[1], info = images[String(image)] || [String(image), "", 0];
      var key = info[0], label = info[1];
      var fig = el("figure");
      var tip = key + (label ? " [" + label + "]" : "") + " act=" + fmt(act, 3);
      if (info[2]) {
        var img = el("img");
        img.loading = "lazy";
        img.alt = tip;
        img.src = "img/" + pad(image, 7) + ".jpg";
        fig.appendChild(img);
      } else {
        fig.appendChild(el("div", "noimg", key));
      }
      if (c.heat && c.heat[s]) fig.appendChild(heatCanvas(decodeHeat(c.heat[s])));
      fig.title = tip;
      fig.appendChild(el("figcaption", null, label || key));
      thumbs.appendChild(fig);
    });
    if (!c.top.length && c.top_keys) card.appendChild(el("div", "meta", "top images: " + c.top_keys));
    card.appendChild(thumbs);
    if (c.steering && c.steering.length) card.appendChild(steeringBlock(c.steering));
    if (c.inspect) {  // an inspect run beside the MS run shows this latent on the user's own images
      var link = el("a", "inspect-link", "where it fires in your images \u2192");
      link.href = c.inspect;
      card.appendChild(link);
    }
    return card;
  }
  function cardAt(pos) {
    if (!chunks[Math.floor(pos / CHUNK)]) {
      requestChunk(Math.floor(pos / CHUNK));
      return placeholderCard(pos);
    }
    if (!cardCache[pos]) {
      if (cacheSize > 3000) { cardCache = {}; cacheSize = 0; }  // bound the memory of long scrolls
      cardCache[pos] = buildCard(pos);
      cacheSize++;
    }
    return cardCache[pos];
  }

  function summaryPanels() {
    var box = document.getElementById("summary");
    var s = DATA.summary;
    if (s) {
      var p = el("div", "panel");
      p.appendChild(el("h2", null, "Monosemanticity"));
      var t = el("table"), hr = el("tr");
      ["", "mean", "std", "min", "max", "dead", "n"].forEach(function (h) { hr.appendChild(el("th", null, h)); });
      t.appendChild(hr);
      [["SAE latents", s], ["raw neurons", s.baseline]].forEach(function (row) {
        if (!row[1]) return;
        var tr = el("tr"), r = row[1];
        tr.appendChild(el("td", null, row[0]));
        [fmt(r.mean), fmt(r.std), fmt(r.min), fmt(r.max), r.dead, r.n_latents].forEach(function (v) {
          tr.appendChild(el("td", null, v === undefined ? "" : v));
        });
        t.appendChild(tr);
      });
      p.appendChild(t);
      if (s.n_images !== undefined) p.appendChild(el("div", "muted", s.n_images + " images"));
      box.appendChild(p);
    }
    var h = DATA.hierarchy;
    if (h && h.groups && h.groups.length) {
      var hp = el("div", "panel");
      hp.appendChild(el("h2", null, "Hierarchy (LCA depth per group)"));
      var ht = el("table"), hh = el("tr");
      ["group", "latents", "depth", "MS mean"].forEach(function (x) { hh.appendChild(el("th", null, x)); });
      ht.appendChild(hh);
      h.groups.forEach(function (g) {
        var tr = el("tr");
        [g.group, g.n_latents, fmt(g.depth_mean, 2), fmt(g.ms_mean)].forEach(function (v) { tr.appendChild(el("td", null, v)); });
        ht.appendChild(tr);
      });
      hp.appendChild(ht);
      box.appendChild(hp);
    }
    (DATA.plots || []).forEach(function (pl) {
      var pp = el("div", "panel");
      pp.appendChild(el("h2", null, pl.caption));
      var img = el("img");
      img.src = pl.src; img.alt = pl.caption;
      pp.appendChild(img);
      box.appendChild(pp);
    });
    var info = el("div", "panel");
    info.appendChild(el("h2", null, "About"));
    var which = DATA.max_cards === null ? "every latent" : "top " + DATA.max_cards + " by MS, plus steered latents";
    info.appendChild(el("div", null, DATA.n_cards + " cards of " + DATA.n_latents + " latents (" + which + ")"));
    if (!DATA.inline) info.appendChild(el("div", "muted", DATA.n_chunks + " chunks of " + CHUNK + " cards, loaded on demand"));
    info.appendChild(el("div", "muted", DATA.heatmap_note));
    info.appendChild(el("div", "muted", "MS run: " + DATA.sources.ms));
    if (DATA.sources.hierarchy) info.appendChild(el("div", "muted", "hierarchy run: " + DATA.sources.hierarchy));
    DATA.steering.forEach(function (ex) {
      var what = "steering run " + ex.steering_run + ": latent(s) " + ex.latents.join(", ");
      if (!ex.same_sae) what += " of another SAE (" + ex.sae_path + "), not attached to these cards";
      info.appendChild(el("div", "muted", what));
    });
    box.appendChild(info);
  }

  // Sorting and search work on the inline index (every card), never on the DOM.
  function sortedPositions() {
    var cacheKey = state.key + ":" + state.dir;
    if (sortedCache[cacheKey]) return sortedCache[cacheKey];
    var col = state.key === "latent" ? IDX.latent : IDX[state.key], dir = state.dir;
    var pos = new Array(N);
    for (var i = 0; i < N; i++) pos[i] = i;
    pos.sort(function (a, b) {
      var va = col[a], vb = col[b];
      var na = va === null || va === undefined, nb = vb === null || vb === undefined;
      if (na !== nb) return na ? 1 : -1;  // missing values always last
      if (!na && va !== vb) return dir * (va < vb ? -1 : 1);
      return IDX.latent[a] - IDX.latent[b];
    });
    sortedCache[cacheKey] = pos;
    return pos;
  }
  function filter(positions, q) {
    if (!q) return positions;
    var id = q.replace(/^#/, ""), num = /^\d+$/.test(id) ? Number(id) : -1, text = IDX.text, lat = IDX.latent;
    var out = [];
    for (var i = 0; i < positions.length; i++) {
      var p = positions[i];
      if (lat[p] === num || text[p].indexOf(q) >= 0) out.push(p);
    }
    return out;
  }

  // Virtual list: rows of `cols` cards, ROW_H tall; only rows near the viewport are rendered, the
  // container's padding stands in for the rows above and its height for the whole list.
  var cols = 1, lastWindow = "";
  function layout() {
    var width = cardsEl.clientWidth || window.innerWidth;
    cols = Math.max(1, Math.floor((width + GAP) / (MIN_CARD_W + GAP)));
    cardsEl.style.gridTemplateColumns = "repeat(" + cols + ", minmax(0, 1fr))";
    cardsEl.style.gridAutoRows = ROW_H + "px";
    var rows = Math.ceil(order.length / cols);
    cardsEl.style.height = Math.max(0, rows * (ROW_H + GAP) - GAP) + "px";
  }
  function renderWindow(force) {
    var rows = Math.ceil(order.length / cols), step = ROW_H + GAP;
    var top = cardsEl.getBoundingClientRect().top;  // < 0 once the list has scrolled up
    var first = Math.max(0, Math.floor(-top / step) - MARGIN_ROWS);
    var last = Math.min(rows - 1, Math.floor((window.innerHeight - top) / step) + MARGIN_ROWS);
    var loaded = Object.keys(chunks).length;
    var key = first + ":" + last + ":" + loaded;
    if (!force && key === lastWindow) return;
    lastWindow = key;
    cardsEl.style.paddingTop = first * step + "px";
    var els = [];
    for (var r = first; r <= last; r++) {
      for (var i = r * cols; i < Math.min(order.length, (r + 1) * cols); i++) els.push(cardAt(order[i]));
    }
    cardsEl.replaceChildren.apply(cardsEl, els);
    if (window.__vlmsaeFirstCards === undefined && cardsEl.querySelector(".card[data-loaded]")) {
      window.__vlmsaeFirstCards = performance.now();  // the bench's first-paint mark
    }
  }
  function render() {
    order = filter(sortedPositions(), state.query);
    document.getElementById("count").textContent = order.length + " / " + N + " cards";
    document.getElementById("empty").hidden = order.length > 0;
    Array.prototype.forEach.call(document.querySelectorAll("button.sort"), function (b) {
      var on = b.dataset.key === state.key;
      b.classList.toggle("active", on);
      b.textContent = b.dataset.label + (on ? (state.dir < 0 ? " \u2193" : " \u2191") : "");
    });
    layout();
    renderWindow(true);
  }

  document.getElementById("model-line").textContent = DATA.model || "";
  summaryPanels();
  (DATA.chunks || []).forEach(function (p) { chunks[p.chunk] = p; });
  Array.prototype.forEach.call(document.querySelectorAll("button.sort"), function (b) {
    b.dataset.label = b.textContent;
    b.addEventListener("click", function () {
      if (state.key === b.dataset.key) state.dir = -state.dir;  // second click flips the order
      else { state.key = b.dataset.key; state.dir = Number(b.dataset.dir); }
      render();
    });
  });
  document.getElementById("search").addEventListener("input", function (e) {
    state.query = e.target.value.trim().toLowerCase();
    render();
  });
  document.getElementById("toggle-heat").addEventListener("change", function (e) {
    document.body.classList.toggle("noheat", !e.target.checked);
  });
  window.addEventListener("scroll", function () { renderWindow(false); }, { passive: true });
  window.addEventListener("resize", function () { layout(); renderWindow(true); });
  render();
  document.body.dataset.ready = "1";
})();
