"""The review page (one HTML file, no external assets): query beside its candidates, keys."""

PAGE = r"""<!doctype html>
<html><head><meta charset="utf-8"><title>reid-ray: review the night</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;background:#f4f4f2;color:#222}
header{background:#24323f;color:#fff;padding:.6em 1.2em;display:flex;gap:2em;align-items:center}
header h1{font-size:1.15em;margin:0}
#bar{flex:1;height:.7em;background:#4a5b6b;border-radius:.35em;overflow:hidden}
#bar div{height:100%;background:#7fc97f}
main{padding:1em 1.2em}
.row{display:flex;gap:14px;align-items:flex-start;flex-wrap:wrap}
.card{background:#fff;border:3px solid #ddd;border-radius:6px;padding:6px;text-align:center}
.card img{height:300px;display:block;margin:auto;background:#eee}
.card.query{border-color:#24323f}
.more{margin-top:10px;align-items:center}.more .card img{height:120px}.more .meta{font-size:.8em}
.moretitle{color:#666;font-size:.9em;width:6em}
.card.chosen{border-color:#2a9d2a;box-shadow:0 0 0 3px #2a9d2a55}
.card .key{display:inline-block;background:#24323f;color:#fff;border-radius:3px;padding:0 .45em;
  font-weight:bold;margin-right:.3em}
.meta{font-size:.9em;margin-top:4px;line-height:1.35}
.prob{font-size:1.25em;font-weight:bold}
.hi{color:#1d7a1d}.mid{color:#a66b00}.lo{color:#b22}
#proposal{font-size:1.05em;margin:.6em 0}
#keys{background:#fff;border:1px solid #ccc;border-radius:6px;padding:.5em .8em;margin:.8em 0;
  display:flex;gap:.6em;flex-wrap:wrap;align-items:center}
#keys button{font-size:1em;padding:.3em .7em}
kbd{background:#eee;border:1px solid #bbb;border-bottom-width:2px;border-radius:3px;padding:0 .35em}
#newname{font-size:1em;padding:.25em;width:12em}
#status{margin:.4em 0;min-height:1.3em;font-weight:bold}
#match img{max-width:100%;border:1px solid #ccc;background:#fff}
.panels{display:flex;gap:1.2em;flex-wrap:wrap;margin-top:1em}
.panel{background:#fff;border:1px solid #ccc;border-radius:6px;padding:.5em .8em;flex:1;
  min-width:22em;max-height:18em;overflow:auto;font-size:.9em}
.panel h3{margin:.2em 0 .4em;font-size:1em}
#queue span{display:inline-block;min-width:1.3em;margin:1px;padding:1px 3px;border-radius:3px;
  cursor:pointer;font-size:.8em;text-align:center;background:#ddd}
#queue span.done{background:#9fd49f}#queue span.skip{background:#f1d48a}
#queue span.rej{background:#e6a1a1}#queue span.at{outline:2px solid #24323f}
.bad{color:#b22}.ok{color:#1d7a1d}code{font-size:.85em;word-break:break-all}
</style></head><body>
<header><h1 id="title">review</h1><div id="bar"><div></div></div><div id="progress"></div></header>
<main>
<div id="proposal"></div>
<div id="cards"></div>
<div id="keys">
 <button onclick="decide('top')"><kbd>Enter</kbd> accept top candidate</button>
 <span><kbd>1</kbd>-<kbd>9</kbd> choose candidate N</span>
 <button onclick="startNew()"><kbd>n</kbd> new individual</button>
 <input id="newname" placeholder="name" title="suggested next name (editable); Enter confirms">
 <button onclick="decide('reject')"><kbd>x</kbd> reject image</button>
 <button onclick="decide('skip')"><kbd>s</kbd> skip</button>
 <button onclick="decide('undo')"><kbd>u</kbd> undo</button>
 <span><kbd>&larr;</kbd> <kbd>&rarr;</kbd> previous / next</span>
</div>
<div id="status"></div>
<div id="match"></div>
<div class="panels">
 <div class="panel"><h3>Queue (click to jump)</h3><div id="queue"></div></div>
 <div class="panel"><h3>Reviewed CSV: validation (as <code>gallery merge</code> reads it)</h3>
   <div id="check"></div></div>
 <div class="panel"><h3 id="failedtitle">Failed images</h3><div id="failed"></div></div>
</div>
</main>
<script>
let S = null, at = 0, chosen = null;
const $ = id => document.getElementById(id);
const enc = encodeURIComponent;
function cls(p) { return p == null ? '' : p >= 0.7 ? 'hi' : p >= 0.4 ? 'mid' : 'lo'; }
function pct(p) { return p == null || p === '' ? 'n/a' : (100 * Number(p)).toFixed(0) + '%'; }
function esc(t) { const d = document.createElement('div'); d.textContent = t == null ? '' : t;
  return d.innerHTML; }
async function load() {
  const r = await fetch('api/state'); S = await r.json();
  at = firstOpen(0); render();
}
function firstOpen(from) {
  const n = S.items.length;
  for (let k = 0; k < n; k++) { const i = (from + k) % n;
    if (!(S.items[i].image_id in S.decisions)) return i; }
  return Math.min(from, n - 1);
}
function describe(d) {
  if (!d) return '';
  if (d.action === 'top') return 'accepted the top candidate';
  if (d.action === 'candidate') return 'chose candidate ' + d.candidate;
  if (d.action === 'new') return 'new individual "' + d.identity + '"';
  if (d.action === 'reject') return 'rejected (not merged)';
  if (d.action === 'skip') return 'skipped (not reviewed)';
  return d.action;
}
function render() {
  $('title').textContent = 'Night ' + S.night + ' \u00b7 gallery ' + S.gallery_version;
  const total = S.total;
  $('progress').textContent = S.reviewed + ' of ' + total + ' reviewed' +
    (S.skipped ? ' (' + S.skipped + ' skipped)' : '') + (S.reviewed === total ? ': all done' : '');
  $('bar').firstElementChild.style.width = (total ? 100 * S.reviewed / total : 100) + '%';
  renderCheck(); renderFailed(); renderQueue();
  if (!S.items.length) { $('proposal').textContent = 'Nothing to review.'; return; }
  const it = S.items[at], d = S.decisions[it.image_id];
  const prop = it.proposed_decision === 'known'
    ? 'known: <b>' + esc(it.proposed_identity) + '</b>'
    : 'new individual (provisional <b>' + esc(it.proposed_identity) + '</b>)';
  $('proposal').innerHTML = '<b>' + (at + 1) + ' / ' + total + '</b> \u00b7 image <code>' +
    esc(it.image_id) + '</code> \u00b7 identify proposed ' + prop + ', confidence <span class="' +
    cls(Number(it.confidence)) + '">' + pct(it.confidence) + '</span>';
  let html = '<div class="card query"><img src="image?kind=night&id=' + enc(it.image_id) +
    '" alt="query"><div class="meta"><b>query</b><br>' + esc(it.image_id) + '</div></div>';
  for (const c of it.candidates) {
    if (c.n === 4) html += '</div><div class="row more"><div class="moretitle">more candidates</div>';
    const isChosen = d && ((d.action === 'top' && c.n === 1) ||
      (d.action === 'candidate' && d.candidate === c.n));
    html += '<div class="card' + (isChosen ? ' chosen' : '') + '" onclick="pick(' + c.n +
      ')"><img src="image?kind=gallery&id=' + enc(c.image_id) + '" alt="candidate ' + c.n +
      '"><div class="meta"><span class="key">' + c.n + '</span><b>' + esc(c.identity) +
      '</b><br><span class="prob ' + cls(c.probability) + '">' + pct(c.probability) +
      '</span> same individual<br>cosine ' + (c.cosine == null ? 'n/a' : c.cosine.toFixed(3)) +
      (c.local == null ? '' : ' \u00b7 local ' + c.local.toFixed(1)) +
      (S.reranked ? '<br><a href="#" onclick="showMatch(' + c.n +
      ');event.stopPropagation();return false">matches</a>' : '') + '</div></div>';
  }
  if (!it.candidates.length) html += '<div class="card">no candidate</div>';
  $('cards').innerHTML = '<div class="row">' + html + '</div>';
  $('status').innerHTML = d ? 'Decided: ' + esc(describe(d)) : '';
  if (S.reranked && it.candidates.length) showMatch(chosenOrTop(d)); else
    $('match').innerHTML = S.reranked ? '' : '<i>This night was not re-ranked: no match drawing.</i>';
  suggest(it);
}
function chosenOrTop(d) { return d && d.action === 'candidate' ? d.candidate : 1; }
function showMatch(n) {
  const it = S.items[at];
  $('match').innerHTML = '<div>Local-feature matches, query | candidate ' + n + '</div>' +
    '<img src="match?id=' + enc(it.image_id) + '&n=' + n + '" alt="match drawing" ' +
    'onerror="this.replaceWith(\'no match drawing for this pair\')">';
}
async function suggest(it) {
  const d = S.decisions[it.image_id];
  if (d && d.action === 'new') { $('newname').value = d.identity; return; }
  const r = await fetch('api/suggest?id=' + enc(it.image_id));
  if (!r.ok) return;
  const s = await r.json();
  if (S.items[at] === it) { $('newname').value = s.name || ''; $('newname').title = s.why; }
}
function renderCheck() {
  const c = S.check;
  let html = '<div class="' + (c.ok ? 'ok' : 'bad') + '">' + esc(c.summary) + '</div>';
  for (const e of c.errors) html += '<div class="bad">' + esc(e.image_id) + ': ' + esc(e.reason) + '</div>';
  html += '<div style="margin-top:.5em">Written to <code>' + esc(S.reviewed_csv) +
    '</code> after every decision. Merge with:<br><code>' + esc(S.merge_command) + '</code></div>';
  if (S.dropped.length) html += '<div class="bad">Earlier decisions not loaded: ' +
    S.dropped.map(esc).join('; ') + '</div>';
  $('check').innerHTML = html;
}
function renderFailed() {
  $('failedtitle').textContent = 'Failed images (' + S.failed.length + '), not identified';
  $('failed').innerHTML = S.failed.length ? S.failed.map(f => '<div><code>' + esc(f.image_id) +
    '</code> ' + esc(f.path) + ': ' + esc(f.reason) + '</div>').join('') : 'none';
}
function renderQueue() {
  $('queue').innerHTML = S.items.map((it, i) => {
    const d = S.decisions[it.image_id];
    const k = !d ? '' : d.action === 'skip' ? 'skip' : d.action === 'reject' ? 'rej' : 'done';
    return '<span class="' + k + (i === at ? ' at' : '') + '" title="' + esc(it.image_id) + ': ' +
      esc(describe(d) || 'not reviewed') + '" onclick="go(' + i + ')">' + (i + 1) + '</span>';
  }).join('');
}
function go(i) { at = Math.max(0, Math.min(S.items.length - 1, i)); render(); }
function pick(n) { decide('candidate', {candidate: n}); }
function startNew() { const e = $('newname'); e.focus(); e.select(); }
async function decide(action, extra) {
  if (!S.items.length) return;
  const it = S.items[at];
  const body = Object.assign({image_id: it.image_id, action: action}, extra || {});
  const r = await fetch('api/decide', {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify(body)});
  if (!r.ok) { $('status').innerHTML = '<span class="bad">' + esc(await r.text()) + '</span>'; return; }
  Object.assign(S, await r.json());
  if (action === 'undo') { render(); return; }
  at = firstOpen(at); render();
}
$('newname').addEventListener('keydown', e => {
  if (e.key === 'Enter') { decide('new', {identity: $('newname').value}); $('newname').blur();
    e.preventDefault(); }
  else if (e.key === 'Escape') $('newname').blur();
  e.stopPropagation();
});
document.addEventListener('keydown', e => {
  if (e.ctrlKey || e.metaKey || e.altKey || !S) return;
  if (e.key === 'Enter' || e.key === 'a') decide('top');
  else if (/^[1-9]$/.test(e.key)) pick(Number(e.key));
  else if (e.key === 'n') { startNew(); e.preventDefault(); }
  else if (e.key === 'x') decide('reject');
  else if (e.key === 's') decide('skip');
  else if (e.key === 'u') decide('undo');
  else if (e.key === 'ArrowRight') go(at + 1);
  else if (e.key === 'ArrowLeft') go(at - 1);
});
window.addEventListener('focus', async () => {  // decisions made in another tab
  const r = await fetch('api/progress'); if (r.ok) { Object.assign(S, await r.json()); render(); }
});
load();
</script></body></html>
"""
