// vlmsae feature browser. All data is inline (no fetch, works from file://). Every string from the
// data reaches the DOM through textContent or a property, never through innerHTML.
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("browser-data").textContent);
  var cardsEl = document.getElementById("cards");
  var state = { key: "ms", dir: -1, query: "" };

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

  function buildCard(c) {
    var card = el("article", "card");
    card.dataset.latent = c.latent;
    var head = el("div", "card-head");
    head.appendChild(el("span", "lid", "#" + c.latent));
    var badge = el("span", "badge", c.group === null || c.group === undefined ? "no group" : "group " + c.group);
    badge.style.background = groupColor(c.group);
    head.appendChild(badge);
    head.appendChild(el("span", "ms", c.ms === null ? "MS dead" : "MS " + fmt(c.ms)));
    card.appendChild(head);
    var bar = el("div", "msbar"), fill = el("div");
    fill.style.width = (c.ms === null ? 0 : Math.max(0, Math.min(1, c.ms)) * 100) + "%";
    bar.appendChild(fill);
    card.appendChild(bar);
    card.appendChild(el("div", "label", c.label || ""));
    var meta = ["freq " + pct(c.freq), "max act " + fmt(c.max_act, 2)];
    if (c.depth_mean !== null && c.depth_mean !== undefined) meta.push("LCA depth " + fmt(c.depth_mean, 2));
    card.appendChild(el("div", "meta", meta.join(" · ")));
    var ranks = Object.keys(c.ranks || {});
    if (ranks.length) {
      card.appendChild(el("div", "ranks", ranks.map(function (r) { return r + ": " + c.ranks[r]; }).join(" › ")));
    }
    var thumbs = el("div", "thumbs");
    c.top.forEach(function (t) {
      var fig = el("figure");
      var tip = t.key + (t.label ? " [" + t.label + "]" : "") + " act=" + fmt(t.act, 3);
      if (t.src) {
        var img = el("img");
        img.loading = "lazy";
        img.alt = tip;
        img.src = t.src;
        fig.appendChild(img);
      } else {
        fig.appendChild(el("div", "noimg", t.key));
      }
      if (t.heat) fig.appendChild(heatCanvas(t.heat));
      fig.title = tip;
      fig.appendChild(el("figcaption", null, t.label || t.key));
      thumbs.appendChild(fig);
    });
    if (!c.top.length && c.top_keys) card.appendChild(el("div", "meta", "top images: " + c.top_keys));
    card.appendChild(thumbs);
    if (c.steering && c.steering.length) card.appendChild(steeringBlock(c.steering));
    // What search matches: latent id, taxonomy label, taxa, top-image labels.
    c._text = [c.label || "", ranks.map(function (r) { return c.ranks[r]; }).join(" "),
               c.top.map(function (t) { return t.label; }).join(" ")].join(" ").toLowerCase();
    c._el = card;
    return card;
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
    info.appendChild(el("div", null, DATA.n_cards + " cards of " + DATA.n_latents + " latents (top " + DATA.max_cards + " by MS, plus steered latents)"));
    info.appendChild(el("div", "muted", DATA.heatmap_note));
    info.appendChild(el("div", "muted", "MS run: " + DATA.sources.ms));
    if (DATA.sources.hierarchy) info.appendChild(el("div", "muted", "hierarchy run: " + DATA.sources.hierarchy));
    DATA.steering.forEach(function (ex) {
      var what = "steering run " + ex.source + ": latent(s) " + ex.latents.join(", ");
      if (!ex.same_sae) what += " of another SAE (" + ex.sae_path + "), not attached to these cards";
      info.appendChild(el("div", "muted", what));
    });
    box.appendChild(info);
  }

  function sortValue(c, key) {
    var v = c[key];
    return (v === null || v === undefined) ? null : v;
  }
  function compare(a, b) {
    var va = sortValue(a, state.key), vb = sortValue(b, state.key);
    if (va === null && vb !== null) return 1;   // missing values always last
    if (vb === null && va !== null) return -1;
    if (va !== vb && va !== null) return state.dir * (va < vb ? -1 : 1);
    return a.latent - b.latent;
  }
  function matches(c, q) {
    if (!q) return true;
    var id = q.replace(/^#/, "");
    if (/^\d+$/.test(id)) return String(c.latent) === id || c._text.indexOf(q) >= 0;
    return c._text.indexOf(q) >= 0;
  }
  function render() {
    var sorted = DATA.cards.slice().sort(compare);
    var shown = 0;
    sorted.forEach(function (c) {
      var ok = matches(c, state.query);
      c._el.hidden = !ok;
      if (ok) shown++;
      cardsEl.appendChild(c._el);  // re-appending moves the node: DOM order = sort order
    });
    document.getElementById("count").textContent = shown + " / " + DATA.cards.length + " cards";
    document.getElementById("empty").hidden = shown > 0;
    Array.prototype.forEach.call(document.querySelectorAll("button.sort"), function (b) {
      var on = b.dataset.key === state.key;
      b.classList.toggle("active", on);
      b.textContent = b.dataset.label + (on ? (state.dir < 0 ? " \u2193" : " \u2191") : "");
    });
  }

  document.getElementById("model-line").textContent = DATA.model || "";
  summaryPanels();
  DATA.cards.forEach(buildCard);
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
  render();
  document.body.dataset.ready = "1";
})();
