"""The review page's server: aiohttp (as the annotation page), bound to 127.0.0.1 by default.

Thin over :class:`~reid_ray.review.state.ReviewState`, which holds the decisions and is the
only writer of the files; blocking work (files, image crops, match drawings) runs on the
default executor. A lock file ``DIR/review.lock`` keeps a second server off the same night.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from functools import partial

from reid_ray import io as rio
from reid_ray.errors import ConfigError, ImageError, ReidRayError
from reid_ray.review.images import DEFAULT_HEIGHT, match_drawing, read_crop
from reid_ray.review.page import PAGE
from reid_ray.review.state import ReviewState

logger = logging.getLogger(__name__)

LOCK_NAME = "review.lock"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ServerLock:
    """``DIR/review.lock`` holding this process's id: one review server per night (a lock
    left by a process that is gone is taken over). Local folders only."""

    path: str | None

    def __init__(self, results_dir: str):
        self.path = None if rio.is_remote(results_dir) else rio.join(results_dir, LOCK_NAME)
        if self.path is None:
            logger.warning("%s is remote: no lock against a second review server", results_dir)
            return
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(open(self.path).read().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):  # this process too: a second server in it
                    raise ConfigError(
                        f"another review server (process {pid}) is serving {results_dir}: "
                        f"use its page, or stop it (or remove {self.path} if it is gone)"
                    ) from None
                os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            return
        raise ConfigError(f"could not take {self.path}")

    def release(self) -> None:
        if self.path and os.path.exists(self.path):
            os.remove(self.path)


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
        from aiohttp import web

        self.lock = ServerLock(results_dir)
        try:
            self.state = ReviewState(results_dir, **kwargs)
        except BaseException:
            self.lock.release()
            raise
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(make_app(self.state))
        ready = threading.Event()
        errors: list[BaseException] = []

        def serve_forever() -> None:
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

        self._thread = threading.Thread(target=serve_forever, name="review-page", daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            self.lock.release()
            raise ConfigError(f"could not start the review page: {errors[0]}")

    def stop(self) -> None:
        async def close():
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
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

    if host not in LOOPBACK:
        logger.warning("the review page has no login; serving on %s exposes it", host)
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
