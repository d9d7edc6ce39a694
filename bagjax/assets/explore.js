// The bagjax evidence explorer (bagjax/explore.py writes the data; this script draws it). Vanilla JS, no network.
(function () {
  'use strict';
  const D = JSON.parse(document.getElementById('explore-data').textContent);
  const names = D.classNames;
  const $ = (id) => document.getElementById(id);
  const DISPLAY = 384;  // displayed image width in CSS px
  const MATRIX_CLASSES = 30;  // at most this many rows and columns in the confusion matrix

  // ---------------------------------------------------------------------------------------- decoding
  function halfToFloat(h) {  // IEEE 754 binary16 -> number
    const sign = h & 0x8000 ? -1 : 1;
    const exp = (h >> 10) & 0x1f;
    const frac = h & 0x3ff;
    if (exp === 0) return sign * frac * Math.pow(2, -24);
    if (exp === 31) return frac ? NaN : sign * Infinity;
    return sign * (1 + frac / 1024) * Math.pow(2, exp - 15);
  }
  function decode(enc) {  // {dtype, shape, data (base64, little-endian)} -> {shape, values: Float64Array}
    const bytes = Uint8Array.from(atob(enc.data), (c) => c.charCodeAt(0));
    const view = new DataView(bytes.buffer);
    const n = enc.shape.reduce((a, b) => a * b, 1);
    const values = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      values[i] = enc.dtype === 'float16' ? halfToFloat(view.getUint16(2 * i, true)) : view.getFloat32(4 * i, true);
    }
    return {shape: enc.shape, values: values, bound: enc.bound};
  }
  const decoded = new Map();
  function mapOf(img, m) {  // decoded (gh, gw, M) tensor of map m of image img, cached
    const key = img + '/' + m;
    if (!decoded.has(key)) decoded.set(key, decode(D.images[img].maps[m].values));
    return decoded.get(key);
  }

  // ---------------------------------------------------------------------------------------- state
  const state = {img: 0, cls: null, map: 0, stride1: false, hover: null, pinned: false, seed: D.seed || 0,
                 filter: null, patch: 0};
  const cur = () => D.images[state.img];
  const pct = (p) => (100 * p).toFixed(1) + ' %';
  const fmt = (v) => (Math.abs(v) >= 100 ? v.toFixed(1) : v.toFixed(3));

  function classColumn(rec, cls) { return rec.classes.indexOf(cls); }

  function currentMap() {  // {values (rows x cols), rows, cols, native: bool}
    const rec = cur();
    if (state.stride1 && rec.stride1 && rec.stride1[String(state.cls)]) {
      const t = decode(rec.stride1[String(state.cls)]);
      return {values: t.values, rows: t.shape[0], cols: t.shape[1], native: false, bound: t.bound};
    }
    const t = mapOf(state.img, state.map);
    const [rows, cols, m] = t.shape;
    const col = classColumn(rec, state.cls);
    const values = new Float64Array(rows * cols);
    for (let p = 0; p < rows * cols; p++) values[p] = t.values[p * m + col];
    return {values: values, rows: rows, cols: cols, native: true, bound: t.bound};
  }

  function symmetricLimit(values, percentile) {  // interpret.symmetric_limit: numpy's linear percentile of |v|
    const a = Array.from(values, Math.abs).sort((x, y) => x - y);
    const pos = (percentile / 100) * (a.length - 1);
    const lo = Math.floor(pos);
    const hi = Math.min(lo + 1, a.length - 1);
    const v = a[lo] + (a[hi] - a[lo]) * (pos - lo);
    return v > 0 ? v : 1;
  }
  function colour(v, limit) {
    const t = Math.max(0, Math.min(255, Math.round((v / limit + 1) / 2 * 255)));
    return D.colormap[t];
  }

  // ---------------------------------------------------------------------------------------- drawing
  const imageCache = new Map();
  function withImage(i, draw) {
    if (imageCache.has(i) && imageCache.get(i).complete) { draw(imageCache.get(i)); return; }
    const im = imageCache.get(i) || new Image();
    im.addEventListener('load', () => { if (state.img === i) draw(im); }, {once: true});
    if (!imageCache.has(i)) { im.src = D.images[i].image; imageCache.set(i, im); }
  }
  function scale() { return DISPLAY / cur().width; }

  function drawBase() {
    const rec = cur();
    const base = $('base');
    base.width = rec.width; base.height = rec.height;
    const s = scale();
    for (const c of [base, $('overlay'), $('boxes')]) {
      c.style.width = rec.width * s + 'px'; c.style.height = rec.height * s + 'px';
    }
    $('stage').style.width = rec.width * s + 'px'; $('stage').style.height = rec.height * s + 'px';
    const i = state.img;
    withImage(i, (im) => { base.getContext('2d').drawImage(im, 0, 0); drawEvident(); });
  }

  function drawOverlay() {
    const rec = cur();
    const map = currentMap();
    const limit = symmetricLimit(map.values, 99);
    const small = document.createElement('canvas');
    small.width = map.cols; small.height = map.rows;
    const ctx = small.getContext('2d');
    const pixels = ctx.createImageData(map.cols, map.rows);
    const kept = map.native && rec.robust && state.map === 0 && $('show-kept').checked ? new Set(currentKept()) : null;
    for (let p = 0; p < map.values.length; p++) {
      const [r, g, b] = kept && !kept.has(p) ? [128, 128, 128] : colour(map.values[p], limit);
      pixels.data.set([r, g, b, 255], 4 * p);
    }
    ctx.putImageData(pixels, 0, 0);
    const overlay = $('overlay');
    overlay.width = rec.width; overlay.height = rec.height;
    const octx = overlay.getContext('2d');
    octx.imageSmoothingEnabled = false;
    octx.drawImage(small, 0, 0, rec.width, rec.height);  // stretched over the image, as interpret.plot_heatmap
    overlay.style.opacity = $('opacity').value / 100;
    $('legend-low').textContent = fmt(-limit);
    $('legend-high').textContent = '+' + fmt(limit);
    overlay.dataset.limit = limit;
    const m = rec.maps[state.map];
    $('map-note').textContent = (map.native
      ? `${m.name}: ${map.rows} x ${map.cols} locations` + (m.rf ? `, each the logit of a ${m.rf} px patch, stride ${m.stride}` : '')
      : `exact stride-1 map: the logit of the ${m.rf} px patch centred on every pixel`) +
      `; colours symmetric around 0 at the 99th percentile of |map|; ` + (map.bound > 0 ? `float16, error at most ${map.bound.toExponential(1)}` : 'float32 (exact)');
  }

  function drawLegend() {
    const ctx = $('legend').getContext('2d');
    for (let x = 0; x < 256; x++) {
      const [r, g, b] = D.colormap[x];
      ctx.fillStyle = `rgb(${r},${g},${b})`;
      ctx.fillRect(x, 0, 1, 12);
    }
  }

  function locationBox(rec, m, i, j, rows, cols) {  // [y0, x0, y1, x1] in image pixels
    if (m.rf) {
      return [m.stride * i, m.stride * j, Math.min(rec.height, m.stride * i + m.rf), Math.min(rec.width, m.stride * j + m.rf)];
    }
    return [i * rec.height / rows, j * rec.width / cols, (i + 1) * rec.height / rows, (j + 1) * rec.width / cols];
  }

  function drawBoxes() {
    const rec = cur();
    const canvas = $('boxes');
    const s = scale();
    canvas.width = rec.width * s; canvas.height = rec.height * s;
    const ctx = canvas.getContext('2d');
    const rect = (b, style, dash) => {
      ctx.setLineDash(dash || []); ctx.strokeStyle = style; ctx.lineWidth = 2;
      ctx.strokeRect(b[1] * s + 1, b[0] * s + 1, (b[3] - b[1]) * s - 2, (b[2] - b[0]) * s - 2);
    };
    if (rec.rule && rec.maps[state.map].name === 'branch ' + rec.rule.patch) {
      for (const b of rec.rule.boxes) rect([b[0], b[1], b[0] + rec.rule.patch, b[1] + rec.rule.patch], '#0a0');
    }
    if (rec.robust) {
      rect(rec.robust[state.patch].box, '#000', [6, 4]);
    }
    if (state.hover) rect(state.hover.box, '#ff0');
  }

  // ---------------------------------------------------------------------------------------- panels
  function topClassesOf(rec, t, p, k) {  // the top-k embedded classes at location p: [[cls, logit], ...]
    const m = t.shape[2];
    const row = [];
    for (let c = 0; c < m; c++) row.push([rec.classes[c], t.values[p * m + c]]);
    return row.sort((a, b) => b[1] - a[1]).slice(0, k);
  }

  function showLocation(ev) {
    const rec = cur();
    const s = scale();
    const y = ev.offsetY / s, x = ev.offsetX / s;
    const t = mapOf(state.img, state.map);
    const [rows, cols] = t.shape;
    const i = Math.max(0, Math.min(rows - 1, Math.floor(y * rows / rec.height)));
    const j = Math.max(0, Math.min(cols - 1, Math.floor(x * cols / rec.width)));
    const m = rec.maps[state.map];
    const box = locationBox(rec, m, i, j, rows, cols);
    state.hover = {i: i, j: j, box: box};
    const top = topClassesOf(rec, t, i * cols + j, 5);
    const rowsHtml = top.map(([c, v]) => `<tr><td class="name">${esc(names[c])}</td><td>${fmt(v)}</td></tr>`).join('');
    $('patch-info').innerHTML = `location (${i}, ${j}), pixels [${box.map((v) => Math.round(v)).join(', ')}]` +
      (m.rf ? '' : ' (a CAM location sees most of the image; the box is its cell)') +
      `<table><tr><th class="name">class</th><th>logit</th></tr>${rowsHtml}</table>`;
    $('patch-info').dataset.location = i + ',' + j;
    drawBoxes();
  }

  function drawEvident() {
    const rec = cur();
    const t = mapOf(state.img, state.map);
    const [rows, cols, m] = t.shape;
    const col = classColumn(rec, state.cls);
    const order = [];
    for (let p = 0; p < rows * cols; p++) order.push(p);
    order.sort((a, b) => t.values[b * m + col] - t.values[a * m + col] || a - b);
    const holder = $('evident');
    holder.innerHTML = '';
    const im = imageCache.get(state.img);
    for (const p of order.slice(0, 6)) {
      const i = Math.floor(p / cols), j = p % cols;
      const b = locationBox(rec, rec.maps[state.map], i, j, rows, cols);
      const fig = document.createElement('figure');
      const c = document.createElement('canvas');
      c.width = Math.max(1, Math.round(b[3] - b[1])); c.height = Math.max(1, Math.round(b[2] - b[0]));
      if (im && im.complete) c.getContext('2d').drawImage(im, b[1], b[0], c.width, c.height, 0, 0, c.width, c.height);
      fig.appendChild(c);
      const cap = document.createElement('figcaption');
      cap.textContent = `(${i}, ${j}) ${fmt(t.values[p * m + col])}`;
      fig.appendChild(cap);
      holder.appendChild(fig);
    }
  }

  function esc(s) { return String(s).replace(/[&<>"]/g, (c) => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c])); }

  function drawTop() {
    const rec = cur();
    $('top').innerHTML = '<tr><th class="name">class</th><th>probability</th><th>logit</th></tr>' +
      rec.top.map(([c, p, l]) => `<tr><td class="name">${esc(names[c])}</td>` +
        `<td><span class="bar" style="width:${Math.round(60 * p)}px"></span> ${pct(p)}</td><td>${fmt(l)}</td></tr>`).join('');
    const label = rec.label === null ? '' : ` (true: ${esc(names[rec.label])})`;
    $('image-title').innerHTML = `${esc(rec.name)}: predicted <b>${esc(names[rec.prediction])}</b>${label}`;
  }

  function fillClassSelect() {
    const rec = cur();
    const select = $('class-select');
    const top = rec.top.map((t) => t[0]);
    let html = '<optgroup label="top predictions">' +
      top.map((c) => `<option value="${c}">${esc(names[c])}</option>`).join('') + '</optgroup><optgroup label="all classes">';
    const order = names.map((n, c) => c).sort((a, b) => names[a].localeCompare(names[b]));
    for (const c of order) {
      const here = rec.classes.indexOf(c) >= 0;
      html += `<option value="${c}"${here ? '' : ' disabled'}>${esc(names[c])}${here ? '' : ' (not embedded)'}</option>`;
    }
    select.innerHTML = html + '</optgroup>';
    select.value = String(state.cls);
  }

  function fillMapSelect() {
    const rec = cur();
    let html = rec.maps.map((m, k) => `<option value="${k}">${esc(m.name)}</option>`).join('');
    if (rec.stride1) html += '<option value="stride1">exact stride 1 (top 3 classes)</option>';
    $('map-select').innerHTML = html;
    $('map-select').value = state.stride1 ? 'stride1' : String(state.map);
  }

  // ---------------------------------------------------------------------------------------- blackout
  function numKept(x, n) { return Math.max(1, Math.min(n, Math.floor(x * n + 0.5))); }  // blackout.num_kept
  function mulberry32(a) {
    return function () {
      a |= 0; a = (a + 0x6D2B79F5) | 0;
      let t = Math.imul(a ^ (a >>> 15), 1 | a);
      t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
  }
  function rankDescending(scores) {  // indices by descending score, ties: lower index first (blackout.top_k_mask)
    return scores.map((v, p) => p).sort((a, b) => scores[b] - scores[a] || a - b);
  }
  function keptSet(policy, x) {  // sorted kept locations (row-major indices into the native grid)
    const rec = cur();
    const t = mapOf(state.img, 0);
    const [rows, cols, m] = t.shape;
    const n = rows * cols;
    const col = classColumn(rec, rec.prediction);
    let kept;
    if (policy === 'random') {
      const draw = mulberry32(state.seed * 1000003 + state.img);
      const u = Array.from({length: n}, () => draw());
      kept = rankDescending(u).slice(0, numKept(x, n));
    } else {
      const scores = Array.from({length: n}, (v, p) => t.values[p * m + col]);
      const order = rankDescending(scores);
      kept = policy === 'top' ? order.slice(0, numKept(x, n)) : order.slice(Math.min(n - 1, Math.floor(x * n + 0.5)));
    }
    return kept.sort((a, b) => a - b);
  }
  function keptPrediction(kept) {  // blackout.kept_patch_logits: mean over kept patches, then argmax (lowest class)
    const rec = cur();
    const t = mapOf(state.img, 0);
    const m = t.shape[2];
    const means = new Float64Array(m);
    for (const p of kept) for (let c = 0; c < m; c++) means[c] += t.values[p * m + c];
    let best = 0;
    for (let c = 0; c < m; c++) { means[c] /= kept.length; if (means[c] > means[best]) best = c; }
    const sorted = Array.from(means).sort((a, b) => b - a);
    return {cls: rec.classes[best], mean: means[best], margin: m > 1 ? sorted[0] - sorted[1] : Infinity};
  }
  function currentKept() { return keptSet($('blackout-policy').value, $('blackout-fraction').value / 100); }
  function updateBlackout() {
    const rec = cur();
    if (!rec.robust) return;
    const policy = $('blackout-policy').value;
    const x = $('blackout-fraction').value / 100;
    $('blackout-percent').textContent = Math.round(x * 100) + ' %';
    $('reshuffle').hidden = policy !== 'random';
    const kept = currentKept();
    if ($('show-kept').checked) drawOverlay();
    const t = mapOf(state.img, 0);
    const n = t.shape[0] * t.shape[1];
    const r = keptPrediction(kept);
    const flipped = r.cls !== rec.prediction;
    const out = $('blackout-result');
    out.dataset.prediction = r.cls;
    out.dataset.kept = kept.join(',');
    out.dataset.flipped = flipped;
    const bound = rec.maps[0].values.bound;
    out.innerHTML = `${kept.length} of ${n} patches kept: predicts <b class="${flipped ? 'flipped' : ''}">` +
      `${esc(names[r.cls])}</b> (mean logit ${fmt(r.mean)})` +
      (flipped ? ` <span class="flipped">flipped from ${esc(names[rec.prediction])}</span>` : ', unchanged') +
      (r.margin <= 2 * bound ? ' <span class="note">(a near tie: within the float16 error)</span>' : '') +
      (rec.cut ? ' <span class="note">(some classes were not embedded: --max-classes)</span>' : '');
  }

  // ---------------------------------------------------------------------------------------- robustness
  function updateRobust() {
    const rec = cur();
    if (!rec.robust) return;
    const r = rec.robust[state.patch];
    const out = $('robust-result');
    out.dataset.certified = r.certified;
    out.dataset.patch = r.patch;
    out.innerHTML = `<span class="flag ${r.certified ? 'yes' : 'no'}">${r.certified ? 'certified' : 'not certified'}</span> ` +
      `against any ${r.patch} x ${r.patch} px patch: masked prediction ${esc(names[r.prediction])}; ` +
      `a ${r.window[0]} x ${r.window[1]} window of locations, the dashed box is the one masking removes ` +
      `(pixels [${r.box.join(', ')}])`;
    drawBoxes();
  }

  function fillRule() {
    const rec = cur();
    if (!rec.rule) return;
    $('branches').innerHTML = '<tr><th>branch</th><th class="name">class</th><th>confidence</th></tr>' +
      rec.rule.branches.map((b, k) => `<tr${k === rec.rule.branch ? ' style="font-weight:bold"' : ''}>` +
        `<td>B${b.rf}</td><td class="name">${esc(names[b.class])}</td><td>${pct(b.confidence)}</td></tr>`).join('');
    $('rule-result').innerHTML = `class (Eq. 7): <b>${esc(names[rec.rule.class])}</b>; branch (Eq. 8): ` +
      `<b>B${rec.rule.patch}</b>; its LSP patches (Algorithm 1) are the green boxes on that branch's map`;
    $('rule-result').dataset.cls = rec.rule.class;
  }

  // ---------------------------------------------------------------------------------------- gallery, dataset
  function fillGallery() {
    const holder = $('gallery-items');
    holder.innerHTML = '';
    D.images.forEach((rec, i) => {
      if (state.filter && !(rec.label === state.filter[0] && rec.prediction === state.filter[1])) return;
      const b = document.createElement('button');
      b.className = 'thumb' + (rec.label !== null && rec.label !== rec.prediction ? ' wrong' : '') +
        (i === state.img ? ' current' : '');
      b.dataset.index = i;
      b.innerHTML = `<img alt="" src="${rec.image}"><div>${esc(rec.name)}</div><div>${esc(names[rec.prediction])}</div>`;
      b.addEventListener('click', () => show(i));
      holder.appendChild(b);
    });
    $('filter-note').textContent = state.filter
      ? `(true ${names[state.filter[0]]}, predicted ${names[state.filter[1]]}; ${holder.children.length} embedded)` : '';
    $('show-all').hidden = !state.filter;
  }

  function fillDataset() {
    const ds = D.dataset;
    if (!ds) return;
    $('dataset').hidden = false;
    const n = ds.labels.length;
    const k = names.length;
    const conf = Array.from({length: k}, () => new Array(k).fill(0));
    ds.labels.forEach((y, i) => { conf[y][ds.predictions[i]] += 1; });
    const correct = ds.labels.filter((y, i) => y === ds.predictions[i]).length;
    $('split').textContent = ds.split;
    $('accuracy').innerHTML = `accuracy <b id="accuracy-value">${pct(correct / n)}</b> (${correct} of ${n}); ` +
      `the gallery holds the ${D.images.length} embedded: misclassified first, then the least confident`;
    $('per-class').innerHTML = '<tr><th class="name">class</th><th>images</th><th>accuracy</th></tr>' +
      conf.map((row, y) => [y, row.reduce((a, b) => a + b, 0), row[y]]).filter((r) => r[1] > 0)
        .map(([y, total, ok]) => `<tr><td class="name">${esc(names[y])}</td><td>${total}</td><td>${pct(ok / total)}</td></tr>`).join('');
    const errors = conf.map((row, y) => row.reduce((a, b) => a + b, 0) - row[y] + conf.reduce((a, r) => a + r[y], 0) - row[y]);
    let shown = conf.map((row, y) => y).filter((y) => conf[y].some((v) => v) || conf.some((row) => row[y]));
    if (shown.length > MATRIX_CLASSES) {  // a readable matrix: the classes with the most errors
      shown = shown.sort((a, b) => errors[b] - errors[a] || a - b).slice(0, MATRIX_CLASSES).sort((a, b) => a - b);
      $('matrix-note').textContent = `(the ${MATRIX_CLASSES} classes with the most errors)`;
    }
    const max = Math.max(1, ...conf.flat());
    let html = '<tr><th></th>' + shown.map((c) => `<th title="${esc(names[c])}">${esc(names[c]).slice(0, 8)}</th>`).join('') + '</tr>';
    for (const y of shown) {
      html += `<tr><th class="name">${esc(names[y])}</th>` + shown.map((p) => {
        const v = conf[y][p];
        const shade = Math.round(255 - 160 * v / max);
        const bg = y === p ? `rgb(${shade},255,${shade})` : `rgb(255,${shade},${shade})`;
        return `<td class="cell" data-true="${y}" data-pred="${p}" style="background:${v ? bg : '#fff'}">${v || ''}</td>`;
      }).join('') + '</tr>';
    }
    $('confusion').innerHTML = html;
    for (const td of $('confusion').querySelectorAll('td.cell')) {
      td.addEventListener('click', () => {
        state.filter = [Number(td.dataset.true), Number(td.dataset.pred)];
        fillGallery();
      });
    }
  }

  // ---------------------------------------------------------------------------------------- wiring
  function redraw() { drawOverlay(); drawBoxes(); drawEvident(); }

  function show(i) {
    state.img = i;
    const rec = cur();
    state.cls = rec.prediction;
    state.map = rec.rule ? rec.rule.branch : 0;
    state.stride1 = D.stride === 1 && !!rec.stride1;
    state.hover = null;
    state.patch = Math.min(state.patch, (rec.robust || [0]).length - 1);
    $('bagnet-panels').hidden = !rec.robust;
    $('anchornet-panel').hidden = !rec.rule;
    $('patch-info').textContent = 'hover or click on the image';
    if (rec.robust) {
      $('patch-size').innerHTML = rec.robust.map((r, k) => `<option value="${k}">${r.patch} x ${r.patch} px</option>`).join('');
      $('patch-size').value = String(state.patch);
    }
    fillClassSelect(); fillMapSelect(); drawTop(); fillRule(); fillGallery();
    drawBase(); redraw(); updateBlackout(); updateRobust();
  }

  $('class-select').addEventListener('change', (e) => {
    state.cls = Number(e.target.value);
    if (state.stride1 && !(cur().stride1 || {})[String(state.cls)]) state.stride1 = false;
    fillMapSelect(); redraw();
  });
  $('map-select').addEventListener('change', (e) => {
    if (e.target.value === 'stride1') {
      state.stride1 = true;
      if (!cur().stride1[String(state.cls)]) { state.cls = cur().top[0][0]; fillClassSelect(); }
    } else { state.stride1 = false; state.map = Number(e.target.value); }
    state.hover = null; redraw();
  });
  $('opacity').addEventListener('input', () => { $('overlay').style.opacity = $('opacity').value / 100; });
  $('boxes').addEventListener('mousemove', (e) => { if (!state.pinned) showLocation(e); });
  $('boxes').addEventListener('click', (e) => { state.pinned = !state.pinned; showLocation(e); });
  $('blackout-policy').addEventListener('change', updateBlackout);
  $('blackout-fraction').addEventListener('input', updateBlackout);
  $('reshuffle').addEventListener('click', () => { state.seed += 1; updateBlackout(); });
  $('show-kept').addEventListener('change', drawOverlay);
  $('patch-size').addEventListener('change', (e) => { state.patch = Number(e.target.value); updateRobust(); });
  $('show-all').addEventListener('click', () => { state.filter = null; fillGallery(); });

  $('model').textContent = `${D.model} (${{bagnet: 'BagNet: patch logits', anchornet: 'AnchorNet: three branches', cam: 'class activation maps'}[D.kind]}), ${names.length} classes`;
  $('footer').textContent = 'Written by python -m bagjax.explore; everything on this page is inline and it makes no network request.';
  drawLegend();
  fillDataset();
  show(0);
  window.bagjaxExplore = {data: D, state: state, show: show, keptSet: keptSet, keptPrediction: keptPrediction};
})();
