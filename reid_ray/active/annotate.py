"""The local annotation page for a pairs folder (``pairs.csv`` + ``thumbs/``).

One pair at a time, both animals cropped to their boxes; keyboard only: ``s`` same,
``d`` different, ``u`` unsure (looked, cannot tell), ``k`` skip (not now: spends no
budget), ``b``/left back, ``n``/right next, ``f`` the whole frames with the boxes, ``z``
zoom, ``?`` help. The server is the only writer: it holds the answers, saves each one at
once to ``answers.partial.csv`` (and ``answers.csv`` once every pair is answered), and a
second page on the same folder is refused, so two tabs (or two sittings) never lose an
answer. Answers already in either file, hand-written ones included, are loaded with the
reader's rules (``oracle.load_answers``). Served by aiohttp (already a dependency through
s3fs), bound to 127.0.0.1 unless told otherwise: the page has no login.
"""

from __future__ import annotations

import asyncio
import logging
import os

from reid_ray import io as rio
from reid_ray.active.oracle import (
    ANSWERS,
    ANSWERS_FILE,
    PARTIAL_FILE,
    load_answers,
    normalise_answer,
    pair_boxes,
    read_pairs_file,
    write_answers,
)
from reid_ray.errors import ConfigError
from reid_ray.webpage import BackgroundServer, PidLock, warn_unless_loopback

logger = logging.getLogger(__name__)

LOCK_FILE = ".annotate.lock"
META_FILE = "pairs.json"  # written by the AL run: round, and the command to run when done
ROUND_FILE = "round.json"

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>reid-ray: same animal?</title>
<style>
body{font-family:sans-serif;margin:1.5em;text-align:center}
img{max-width:98vw;border:1px solid #ccc}
.zoom img{max-width:none}
#progress{color:#555;margin:0.6em}
#message{color:#a00;margin:0.6em}
#help{color:#333;font-size:0.95em}
button{font-size:1.1em;margin:0.3em;padding:0.4em 1em}
</style></head><body>
<h2>Same animal?</h2>
<div id="progress"></div>
<div id="view"></div>
<div id="message"></div>
<div id="pid"></div>
<div id="buttons">
<button onclick="answer('same')"><u>s</u>ame</button>
<button onclick="answer('different')"><u>d</u>ifferent</button>
<button onclick="answer('unsure')"><u>u</u>nsure</button>
<button onclick="answer('skip')">s<u>k</u>ip</button>
<button onclick="move(-1)"><u>b</u>ack</button>
<button onclick="move(1)"><u>n</u>ext</button>
</div>
<div id="previous"></div>
<p id="help">keys: s same, d different, u unsure (looked, cannot tell), k skip (not now,
costs nothing), b or &larr; back, n or &rarr; next, f whole frames, z zoom</p>
<script>
let pairs = [], answers = {}, at = 0, mode = 'pair', nextStep = '';
function el(id) { return document.getElementById(id); }
function firstOpen(from) {
  for (let i = from; i < pairs.length; i++) if (!(pairs[i].pair_id in answers)) return i;
  for (let i = 0; i < from; i++) if (!(pairs[i].pair_id in answers)) return i;
  return pairs.length;
}
async function load() {
  const r = await fetch('api/state'); const s = await r.json();
  pairs = s.pairs; answers = s.answers; nextStep = s.next; at = firstOpen(0); show();
}
function img(src, alt) {
  const i = document.createElement('img'); i.src = src; i.alt = alt;
  i.onerror = () => { el('message').textContent =
    'this image could not be shown (unreadable file?): press f for the frames, k to skip'; };
  return i;
}
function show() {
  const done = pairs.filter(p => p.pair_id in answers).length;
  el('progress').textContent = done + ' of ' + pairs.length + ' answered';
  el('message').textContent = '';
  const view = el('view'); view.innerHTML = ''; view.className = mode === 'zoom' ? 'zoom' : '';
  if (at >= pairs.length) {
    el('pid').textContent = ''; el('previous').textContent = '';
    const h = document.createElement('h3');
    h.textContent = done === pairs.length ? 'All ' + pairs.length + ' pairs answered.' :
      (pairs.length - done) + ' pairs still open (b goes back to them).';
    const p = document.createElement('p'); p.textContent = 'Next: ' + nextStep;
    view.appendChild(h); view.appendChild(p); return;
  }
  const p = pairs[at], id = encodeURIComponent(p.pair_id);
  if (mode === 'pair') {
    if (p.thumbnail) view.appendChild(img('thumbs/' + id, 'the pair'));
    else { view.appendChild(img('view/' + id + '/a?mode=zoom', 'first'));
           view.appendChild(img('view/' + id + '/b?mode=zoom', 'second')); }
  } else {
    for (const side of ['a', 'b']) {
      const d = document.createElement('div');
      d.appendChild(img('view/' + id + '/' + side + '?mode=' + mode, side)); view.appendChild(d);
    }
  }
  el('pid').textContent = p.pair_id + ': ' + p.image_id_a + ' / ' + p.image_id_b +
    (mode === 'pair' ? '' : ' (' + mode + '; press ' + mode[0] + ' again to go back)');
  el('previous').textContent = (p.pair_id in answers) ? 'answered: ' + answers[p.pair_id] : '';
}
async function answer(value) {
  if (at >= pairs.length) return;
  const p = pairs[at];
  const r = await fetch('api/answer', {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({pair_id: p.pair_id, answer: value})});
  if (!r.ok) { el('message').textContent = await r.text(); return; }
  const s = await r.json(); answers = s.answers;  // the server's answers, other tabs' included
  at = firstOpen(at + 1); mode = 'pair'; show();
}
function move(step) { at = Math.max(0, Math.min(pairs.length, at + step)); mode = 'pair'; show(); }
function toggle(m) { mode = (mode === m) ? 'pair' : m; show(); }
document.addEventListener('keydown', e => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const k = e.key;
  if (k === 's') answer('same'); else if (k === 'd') answer('different');
  else if (k === 'u') answer('unsure'); else if (k === 'k') answer('skip');
  else if (k === 'b' || k === 'ArrowLeft') move(-1);
  else if (k === 'n' || k === 'ArrowRight') move(1);
  else if (k === 'f') toggle('frame'); else if (k === 'z') toggle('zoom');
  else if (k === '?') el('help').scrollIntoView();
});
load();
</script></body></html>
"""

NEXT_DEFAULT = "run the same `reid-ray al` command again (it continues with these answers)"


def find_pairs_folder(folder: str) -> str:
    """``folder`` when it holds ``pairs.csv``; for an AL run's ``--out``, the latest round
    still waiting for answers. Anything else is one clear error."""
    if rio.exists(rio.join(folder, "pairs.csv")):
        return folder
    waiting, k = None, 0
    while rio.exists(rio.join(folder, "rounds", f"r{k}")):
        rdir = rio.join(folder, "rounds", f"r{k}")
        if rio.exists(rio.join(rdir, "pairs.csv")) and not rio.exists(rio.join(rdir, ROUND_FILE)):
            waiting = rdir
        k += 1
    if waiting:
        return waiting
    raise ConfigError(
        f"{folder} holds no pairs.csv: --annotate takes a round folder written by "
        "`reid-ray al --oracle human` (OUT/rounds/r<k>) or that run's --out"
    )


class FolderLock(PidLock):
    """One annotation server per pairs folder (:class:`reid_ray.webpage.PidLock`)."""

    def __init__(self, folder: str):
        super().__init__(
            os.path.join(folder, LOCK_FILE),
            lambda pid, path: (
                f"another annotation page (pid {pid}) already serves "
                f"{os.path.dirname(path)}: open that one (one writer per folder)"
            ),
        )


def _next_step(folder: str) -> str:
    meta = rio.join(folder, META_FILE)
    if rio.exists(meta):
        cmd = rio.read_json(meta).get("rerun")
        if cmd:
            return f"run `{cmd}` again (it continues with these answers)"
    return NEXT_DEFAULT


def make_app(folder: str):
    """The aiohttp application serving ``folder``'s pairs (the caller holds the lock)."""
    from aiohttp import web

    from reid_ray.active.views import animal_jpeg, frame_jpeg

    pairs = read_pairs_file(rio.join(folder, "pairs.csv"))
    known = {p["pair_id"]: p for p in pairs}
    loaded = load_answers(folder, pairs)
    for line in loaded.lines()[1:]:
        if not line.startswith("unanswered:"):  # open pairs are what the page is for
            logger.warning("answers of %s: %s", folder, line)
    answers: dict[str, str] = dict(loaded.answers)
    lock = asyncio.Lock()
    next_step = _next_step(folder)

    async def page(_request):
        return web.Response(text=PAGE, content_type="text/html")

    async def state(_request):
        listed = [
            {k: p[k] for k in ("pair_id", "image_id_a", "image_id_b", "thumbnail")} for p in pairs
        ]
        return web.json_response({"pairs": listed, "answers": answers, "next": next_step})

    async def thumb(request):
        p = known.get(request.match_info["pair_id"])
        if p is None or not p["thumbnail"]:
            raise web.HTTPNotFound(text="no such pair or no thumbnail")
        data = rio.read_bytes(rio.join(folder, p["thumbnail"]))
        return web.Response(body=data, content_type="image/jpeg")

    async def view(request):
        p = known.get(request.match_info["pair_id"])
        side = request.match_info["side"]
        mode = request.query.get("mode", "zoom")
        if p is None or side not in ("a", "b") or mode not in ("zoom", "frame"):
            raise web.HTTPNotFound(text="no such pair, side (a, b) or mode (zoom, frame)")
        path, box = p[f"path_{side}"], pair_boxes(p)[0 if side == "a" else 1]
        render = animal_jpeg if mode == "zoom" else frame_jpeg
        try:
            data = await asyncio.get_running_loop().run_in_executor(None, render, path, box)
        except Exception as exc:  # noqa: BLE001 - an unreadable image is a 404 with a reason
            raise web.HTTPNotFound(text=f"{path} could not be shown: {exc}") from None
        return web.Response(body=data, content_type="image/jpeg")

    async def answer(request):
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="expected JSON {pair_id, answer}") from None
        pid, value = str(body.get("pair_id", "")), normalise_answer(body.get("answer"))
        if pid not in known:
            raise web.HTTPBadRequest(text=f"unknown pair id {pid!r}")
        if value is None:
            raise web.HTTPBadRequest(text=f"answer must be one of {', '.join(ANSWERS)}")
        if rio.exists(rio.join(folder, ROUND_FILE)):
            raise web.HTTPConflict(text="this round already used its answers: nothing changed")
        async with lock:
            answers[pid] = value
            write_answers(rio.join(folder, PARTIAL_FILE), answers)
            if len(answers) == len(known):
                write_answers(rio.join(folder, ANSWERS_FILE), answers)
            return web.json_response(
                {"answered": len(answers), "total": len(pairs), "answers": dict(answers)}
            )

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/api/state", state)
    app.router.add_get("/thumbs/{pair_id}", thumb)
    app.router.add_get("/view/{pair_id}/{side}", view)
    app.router.add_post("/api/answer", answer)
    return app


class PageServer:
    """The page on a background thread (tests, notebooks): ``url``, ``folder``, ``stop()``."""

    def __init__(self, folder: str, host: str = "127.0.0.1", port: int = 0):
        self.folder = find_pairs_folder(folder)
        self._lock = FolderLock(self.folder).acquire()
        try:
            self._server = BackgroundServer(make_app(self.folder), host, port, "annotation page")
        except BaseException:
            self._lock.release()
            raise
        self.url = self._server.url

    def stop(self) -> None:
        try:
            self._server.stop()
        finally:
            self._lock.release()


def serve(folder: str, host: str = "127.0.0.1", port: int = 8765, announce=None) -> None:
    """Serve the page until interrupted (``reid-ray al --annotate FOLDER``); ``announce``
    is called with the folder and URL before serving."""
    from aiohttp import web

    folder = find_pairs_folder(folder)
    warn_unless_loopback(host, "annotation page")
    lock = FolderLock(folder)
    lock.acquire()
    try:
        app = make_app(folder)
        if announce:
            announce(folder, f"http://{host}:{port}/")
        web.run_app(app, host=host, port=port, print=logger.info)
    finally:
        lock.release()


__all__ = ["PAGE", "FolderLock", "PageServer", "find_pairs_folder", "make_app", "serve"]
