"""The review page's server: aiohttp (as the annotation page), bound to 127.0.0.1 by default.

Thin over :class:`~reid_ray.review.state.ReviewState`, which holds the decisions and is the
only writer of the files; blocking work (files, image crops, match drawings) runs on the
default executor. A lock file ``DIR/review.lock`` keeps a second server off the same night.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial

from reid_ray import io as rio
from reid_ray.errors import ConfigError, ImageError, ReidRayError
from reid_ray.review.images import DEFAULT_HEIGHT, match_drawing, read_crop
from reid_ray.review.page import PAGE
from reid_ray.review.state import ReviewState
from reid_ray.webpage import BackgroundServer, PidLock, warn_unless_loopback

logger = logging.getLogger(__name__)

LOCK_NAME = "review.lock"


class ServerLock(PidLock):
    """``DIR/review.lock``: one review server per night (:class:`reid_ray.webpage.PidLock`;
    this process counts too, so a second server in it is refused)."""

    def __init__(self, results_dir: str):
        super().__init__(
            rio.join(results_dir, LOCK_NAME),
            lambda pid, path: (
                f"another review server (process {pid}) is serving "
                f"{results_dir}: use its page, or stop it (or remove {path} if it is gone)"
            ),
        )
        self.acquire()


def make_app(state: ReviewState):
    """The aiohttp application serving one night's review."""
    from aiohttp import web

    def run(fn, *args, **kwargs):
        return asyncio.get_running_loop().run_in_executor(None, partial(fn, *args, **kwargs))

    async def page(_request):
        return web.Response(text=PAGE, content_type="text/html")

    async def snapshot(_request):
        return web.json_response(await run(state.snapshot))

    async def progress(_request):
        return web.json_response(await run(state.progress))

    async def suggest(request):
        try:
            return web.json_response(await run(state.suggest, request.query.get("id", "")))
        except ConfigError as exc:
            raise web.HTTPNotFound(text=str(exc)) from None

    async def decide(request):
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="expected JSON {image_id, action, ...}") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="expected a JSON object")
        candidate = body.get("candidate")
        if candidate is not None and not isinstance(candidate, int):
            raise web.HTTPBadRequest(text="candidate must be a number 1-9")
        try:
            result = await run(
                state.decide,
                str(body.get("image_id", "")),
                str(body.get("action", "")),
                candidate=candidate,
                identity=body.get("identity"),
                reviewer=body.get("reviewer"),
            )
        except ReidRayError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        return web.json_response(result)

    async def image(request):
        kind, image_id = request.query.get("kind"), request.query.get("id", "")
        try:
            height = int(request.query.get("h", DEFAULT_HEIGHT))
        except ValueError:
            raise web.HTTPBadRequest(text="h must be a number of pixels") from None
        if kind == "night":
            row = state.results.get(image_id)
        elif kind == "gallery":
            row = state.gallery_images.get(image_id)
        else:
            raise web.HTTPBadRequest(text="kind must be night or gallery")
        if row is None:
            raise web.HTTPNotFound(text=f"no {kind} image {image_id!r}")
        try:
            data = await run(read_crop, row.get("path"), row.get("bbox"), height)
        except ImageError as exc:
            raise web.HTTPNotFound(text=str(exc)) from None
        return web.Response(body=data, content_type="image/jpeg")

    async def match(request):
        try:
            n = int(request.query.get("n", "1"))
            data = await run(match_drawing, state, request.query.get("id", ""), n)
        except (ValueError, ImageError) as exc:
            raise web.HTTPNotFound(text=str(exc)) from None
        return web.Response(body=data, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/api/state", snapshot)
    app.router.add_get("/api/progress", progress)
    app.router.add_get("/api/suggest", suggest)
    app.router.add_post("/api/decide", decide)
    app.router.add_get("/image", image)
    app.router.add_get("/match", match)
    return app


class ReviewServer:
    """The page on a background thread (tests, notebooks): ``url``, ``state``, ``stop()``."""

    def __init__(self, results_dir: str, host: str = "127.0.0.1", port: int = 0, **kwargs):
        self.lock = ServerLock(results_dir)
        try:
            self.state = ReviewState(results_dir, **kwargs)
            self._server = BackgroundServer(make_app(self.state), host, port, "review page")
        except BaseException:
            self.lock.release()
            raise
        self.url = self._server.url

    def stop(self) -> None:
        try:
            self._server.stop()
        finally:
            self.lock.release()


def serve(
    results_dir: str,
    host: str = "127.0.0.1",
    port: int = 8766,
    *,
    ready=None,
    **kwargs,
) -> ReviewState:
    """Serve the review page until interrupted (``reid-ray review``); ``ready(state)`` is
    called before serving. Returns the state as the page left it."""
    from aiohttp import web

    warn_unless_loopback(host, "review page")
    lock = ServerLock(results_dir)
    try:
        state = ReviewState(results_dir, **kwargs)
        if ready is not None:
            ready(state)
        web.run_app(make_app(state), host=host, port=port, print=None)
    finally:
        lock.release()
    return state


__all__ = ["ReviewServer", "ServerLock", "make_app", "serve"]
