"""A small local annotation page for a pairs folder (``pairs.csv`` + ``thumbs/``).

One pair at a time, keys ``s`` (same), ``d`` (different), ``u`` (unsure), ``b`` (back),
a progress count; every answer is saved at once to ``answers.csv`` (the same file
``read_answers`` validates). Served by aiohttp (already a dependency through s3fs), bound
to 127.0.0.1 unless told otherwise: the page has no authentication.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from reid_ray import io as rio
from reid_ray.active.oracle import ALIASES, ANSWERS, read_pairs_file, write_answers
from reid_ray.errors import ConfigError

logger = logging.getLogger(__name__)

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>reid-ray: same animal?</title>
<style>
body{font-family:sans-serif;margin:2em;text-align:center}
img{max-width:95vw;border:1px solid #ccc}
#progress{color:#555;margin:1em}
button{font-size:1.2em;margin:0.3em;padding:0.4em 1em}
.current{font-weight:bold}
</style></head><body>
<h2>Same animal?</h2>
<div id="progress"></div>
<div><img id="thumb" alt="pair"></div>
<div id="pid"></div>
<div>
<button onclick="answer('same')"><u>s</u>ame</button>
<button onclick="answer('different')"><u>d</u>ifferent</button>
<button onclick="answer('unsure')"><u>u</u>nsure</button>
<button onclick="move(-1)"><u>b</u>ack</button>
</div>
<div id="previous"></div>
<script>
let pairs = [], answers = {}, at = 0;
async function load() {
  const r = await fetch('api/state'); const s = await r.json();
  pairs = s.pairs; answers = s.answers;
  at = pairs.findIndex(p => !(p.pair_id in answers)); if (at < 0) at = pairs.length;
  show();
}
function show() {
  const done = Object.keys(answers).length;
  document.getElementById('progress').textContent =
    done + ' of ' + pairs.length + ' answered' + (at >= pairs.length ? ': all done' : '');
  if (at >= pairs.length) { document.getElementById('thumb').removeAttribute('src'); return; }
  const p = pairs[at];
  document.getElementById('thumb').src = 'thumbs/' + encodeURIComponent(p.pair_id);
  document.getElementById('pid').textContent = p.pair_id + ': ' + p.image_id_a + ' / ' + p.image_id_b;
  document.getElementById('previous').textContent =
    (p.pair_id in answers) ? 'answered: ' + answers[p.pair_id] : '';
}
async function answer(value) {
  if (at >= pairs.length) return;
  const p = pairs[at];
  const r = await fetch('api/answer', {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({pair_id: p.pair_id, answer: value})});
  if (!r.ok) { alert(await r.text()); return; }
  answers[p.pair_id] = value; at += 1; show();
}
function move(step) { at = Math.max(0, Math.min(pairs.length, at + step)); show(); }
document.addEventListener('keydown', e => {
  if (e.key === 's') answer('same'); else if (e.key === 'd') answer('different');
  else if (e.key === 'u') answer('unsure'); else if (e.key === 'b') move(-1);
});
load();
</script></body></html>
"""


def _existing_answers(path: str, known: set[str]) -> dict[str, str]:
    """Answers saved earlier (a restarted page continues); rows it cannot use are logged."""
    import csv
    import io

    if not rio.exists(path):
        return {}
    out: dict[str, str] = {}
    reader = csv.reader(io.StringIO(rio.read_bytes(path).decode("utf-8-sig")))
    next(reader, None)
    for row in reader:
        if len(row) == 2 and row[0] in known and ALIASES.get(row[1], row[1]) in ANSWERS:
            out[row[0]] = ALIASES.get(row[1], row[1])
        else:
            logger.warning("%s: row %r not loaded into the page", path, row)
    return out


def make_app(folder: str, answers_file: str | None = None):
    """The aiohttp application serving ``folder``'s pairs."""
    from aiohttp import web

    pairs = read_pairs_file(rio.join(folder, "pairs.csv"))
    known = {p["pair_id"]: p for p in pairs}
    answers_path = answers_file or rio.join(folder, "answers.csv")
    answers = _existing_answers(answers_path, set(known))
    lock = asyncio.Lock()

    async def page(_request):
        return web.Response(text=PAGE, content_type="text/html")

    async def state(_request):
        listed = [
            {k: p[k] for k in ("pair_id", "image_id_a", "image_id_b", "thumbnail")} for p in pairs
        ]
        return web.json_response({"pairs": listed, "answers": answers})

    async def thumb(request):
        p = known.get(request.match_info["pair_id"])
        if p is None or not p["thumbnail"]:
            raise web.HTTPNotFound(text="no such pair or no thumbnail")
        data = rio.read_bytes(rio.join(folder, p["thumbnail"]))
        return web.Response(body=data, content_type="image/jpeg")

    async def answer(request):
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="expected JSON {pair_id, answer}") from None
        pid, value = str(body.get("pair_id", "")), str(body.get("answer", "")).lower()
        value = ALIASES.get(value, value)
        if pid not in known:
            raise web.HTTPBadRequest(text=f"unknown pair id {pid!r}")
        if value not in ANSWERS:
            raise web.HTTPBadRequest(text=f"answer must be one of {', '.join(ANSWERS)}")
        async with lock:
            answers[pid] = value
            write_answers(answers_path, answers)
        return web.json_response({"answered": len(answers), "total": len(pairs)})

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/api/state", state)
    app.router.add_get("/thumbs/{pair_id}", thumb)
    app.router.add_post("/api/answer", answer)
    return app


class PageServer:
    """The page on a background thread (tests, notebooks): ``url``, ``stop()``."""

    def __init__(self, folder: str, host: str = "127.0.0.1", port: int = 0):
        from aiohttp import web

        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(make_app(folder))
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._runner.setup())
                site = web.TCPSite(self._runner, host, port)
                self._loop.run_until_complete(site.start())
                bound = site._server.sockets[0].getsockname()  # noqa: SLF001 - port 0
                self.url = f"http://{host}:{bound[1]}/"
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                errors.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="annotation-page", daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            raise ConfigError(f"could not start the annotation page: {errors[0]}")

    def stop(self) -> None:
        async def close():
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


def serve(folder: str, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the page until interrupted (``reid-ray al --annotate FOLDER``)."""
    from aiohttp import web

    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("the annotation page has no login; serving on %s exposes it", host)
    web.run_app(make_app(folder), host=host, port=port, print=logger.info)


__all__ = ["PAGE", "PageServer", "make_app", "serve"]
