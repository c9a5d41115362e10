"""HTTP preview of a K-LoRA fusion: ``/klora/preview`` (JSON) and ``/klora/preview.png``.

The frontend extension (``web/klora.js``) calls these while the user edits a
"K-LoRA Fuse" node, so the selection map follows alpha, beta, pattern, scope,
steps and the two loaders' files/strengths without queueing a prompt.  No
model is needed: ``nodes/preview_scores.py`` reads the two files (with the
project's one LoRA reader, ``klora_core.safe_load.load_tensors``, which the
loader nodes and the command line use too), scores and caches them.  Module
names are the file reader's canonical names (``down_blocks_1_...``),
not ComfyUI's model keys, so the rows may be named and ordered slightly
differently from the node's own map; the decisions are the same wherever the
two readers pair the same weights (see README "See the fusion").

The request (GET query string, or POST with a JSON object body; parameters
subject, style, subject_strength, style_strength, alpha, beta, pattern, scope,
map_steps) and its validation are ``nodes/preview_params.py``.

Every problem with the request is a 400 with ``{"error": {"type", "param",
"message"}}``; files that cannot be fused (no shared layer, corrupt file) are
a 422 with the same shape.

Scoring runs on the route's own two worker threads (:data:`WORKERS`), never in
asyncio's default thread pool: aiohttp serves files from that pool (ComfyUI's
``/view``), and previews waiting there for the scoring lock once held every
one of its threads (``/view`` took 30.8 s instead of 1.3 ms with six slow
previews in flight).  One pair is scored at a time; a request that needs
scoring while another pair is being scored, or that finds :data:`MAX_WAITING`
requests already waiting, gets a 503 ``{"error": {"type": "busy"}}`` with
``Retry-After`` (the frontend retries), so no thread ever waits on the lock.

Error messages name LoRA files as ComfyUI lists them (relative to the loras
folder), never by their absolute path on the server.

Registration is guarded: without a running ``server.PromptServer`` (e.g. when
tests import the pack in-process) importing this module registers nothing.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from ..klora_core import schedule
from ..klora_core.errors import KLoRAError
from .preview_params import PreviewParams, PreviewRequestError, parse_params
from .preview_scores import CACHE_PAIRS, PreviewBusy, cache_stats, clear_cache, make_plan  # noqa: F401 (API)

logger = logging.getLogger(__name__)

ROUTE_JSON = "/klora/preview"
ROUTE_PNG = "/klora/preview.png"
#: The option values the frontend extension needs (klora_core/options.py), so web/klora.js never re-types them.
ROUTE_OPTIONS = "/klora/options"

MAX_BODY_BYTES = 64 * 1024

#: Threads of the route's own executor: one scores, the other answers cached requests meanwhile.
WORKERS = 2
#: Requests allowed to wait for a worker; beyond that the route answers "busy" at once.
MAX_WAITING = 8
#: Seconds the client is asked to wait before retrying a "busy" answer.
RETRY_AFTER_S = 1


# ---------------------------------------------------------------- the route's own executor

_EXECUTOR = None  # ThreadPoolExecutor, made on first use
_WAITING = 0  # requests submitted to the executor and not finished (changed on the event loop only)


def _executor() -> ThreadPoolExecutor:
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="klora-preview")
    return _EXECUTOR


def _groups(keys) -> list:
    from ..klora_core.render import default_group

    groups = []
    for index, key in enumerate(keys):
        name = default_group(key)
        if groups and groups[-1]["name"] == name:
            groups[-1]["count"] += 1
        else:
            groups.append({"name": name, "start": index, "count": 1})
    return groups


def preview_payload(p: PreviewParams) -> dict:
    """The JSON answer for valid parameters (raises KLoRAError when the files cannot be fused)."""
    plan, scored, hit, notes = make_plan(p)
    steps = p.map_steps
    keys = list(scored.details)
    if plan is not None:
        selection = plan.selection(steps)
        rows = ["".join("1" if c else "0" for c in selection[k]) for k in keys]
        gamma = plan.gamma
        scales = [plan.scale(schedule.step_progress(i, steps)) for i in range(steps)]
    else:
        fill = "0" if p.subject_strength == 0.0 else "1"
        rows = [fill * steps for _ in keys]
        gamma = None
        scales = None
    per_step = [sum(1 for r in rows if r[i] == "1") for i in range(steps)]
    n = len(keys)
    return {
        "version": 1,
        "subject": p.subject,
        "style": p.style,
        "subject_strength": p.subject_strength,
        "style_strength": p.style_strength,
        "pattern": p.pattern,
        "alpha": p.alpha,
        "beta": p.resolved_beta,
        "scope": p.scope,
        "steps": steps,
        "gamma": gamma,
        "scale": scales,
        "keys": keys,
        "groups": _groups(keys),
        # One string per key, one character per step: "1" = subject delta, "0" = style delta.
        "selection": rows,
        "counts": {
            "weights": n,
            "subject_per_step": per_step,
            "first_step": {"subject": per_step[0], "style": n - per_step[0]},
            "last_step": {"subject": per_step[-1], "style": n - per_step[-1]},
            "subject_only": len(scored.subject_only),
            "style_only": len(scored.style_only),
            "outside_scope": scored.outside_scope,
            "subject_modules": scored.subject_modules,
            "style_modules": scored.style_modules,
        },
        "notes": notes,
        "cached": hit,
    }


def preview_png(p: PreviewParams) -> bytes:
    from PIL import PngImagePlugin

    from ..klora_core.render import render_selection_map

    plan, scored, _hit, _notes = make_plan(p)
    if plan is None:
        raise KLoRAError("one strength is 0: there is no selection to draw (every weight takes the other LoRA)")
    image = render_selection_map(plan, p.map_steps, title=f"K-LoRA preview: {p.subject} + {p.style}")
    info = PngImagePlugin.PngInfo()  # keep the cell geometry, as klora_core.render.save_png does
    if "klora:grid" in image.info:
        info.add_text("klora:grid", image.info["klora:grid"])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()

# ---------------------------------------------------------------- aiohttp glue


async def _read_params(request) -> PreviewParams:
    if request.method == "POST":
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise PreviewRequestError(None, f"request body too large (over {MAX_BODY_BYTES} bytes)", status=413,
                                      kind="too_large")
        body = await request.content.read(MAX_BODY_BYTES + 1)
        if len(body) > MAX_BODY_BYTES:
            raise PreviewRequestError(None, f"request body too large (over {MAX_BODY_BYTES} bytes)", status=413,
                                      kind="too_large")
        try:
            raw = json.loads(body.decode("utf-8")) if body.strip() else {}
        except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, ints over 4300 digits, deep nesting
            raise PreviewRequestError(None, f"the request body is not valid JSON ({exc})") from None
        if request.query:  # parameters in both places would be ambiguous
            raise PreviewRequestError(None, "send parameters either in the query string or in the JSON body, "
                                            "not both")
        return parse_params(raw, from_query=False)
    query = request.query
    repeated = sorted({k for k in query.keys() if len(query.getall(k)) > 1})
    if repeated:
        raise PreviewRequestError(repeated[0], f"parameter {repeated[0]!r} is given more than once")
    return parse_params(dict(query), from_query=True)


def relative_names(message: str, p=None) -> str:
    """``message`` with every absolute path of a LoRA file replaced by its name as ComfyUI lists it
    (relative to its loras folder): the route answers clients, who need not see the server's folders."""
    import folder_paths

    if p is not None:
        for name in (p.subject, p.style):
            path = folder_paths.get_full_path("loras", name)
            if path:
                message = message.replace(path, name)
    for folder in sorted(folder_paths.get_folder_paths("loras"), key=len, reverse=True):
        for spelling in {folder, os.path.abspath(folder), os.path.realpath(folder)}:
            message = message.replace(spelling.rstrip(os.sep) + os.sep, "")
    return message


def _busy_response(web):
    return web.json_response(
        {"error": {"type": "busy", "message": "the preview is scoring another pair of LoRA files; retry shortly"}},
        status=503, headers={"Retry-After": str(RETRY_AFTER_S), "Cache-Control": "no-store"})


async def _respond(request, render):
    from aiohttp import web

    global _WAITING
    loop = asyncio.get_running_loop()
    params = None
    try:
        params = await _read_params(request)
        if _WAITING >= MAX_WAITING:
            return _busy_response(web)
        _WAITING += 1
        try:
            result = await loop.run_in_executor(_executor(), render, params)
        finally:
            _WAITING -= 1
    except PreviewBusy:
        return _busy_response(web)
    except PreviewRequestError as exc:
        return web.json_response(exc.payload(), status=exc.status)
    except KLoRAError as exc:
        return web.json_response({"error": {"type": "cannot_fuse", "message": relative_names(str(exc), params)}},
                                 status=422)
    except Exception as exc:  # never let the frontend see an HTML 500 page
        logger.exception("K-LoRA preview failed")
        message = relative_names(f"{type(exc).__name__}: {exc}", params)
        return web.json_response({"error": {"type": "internal", "message": message}}, status=500)
    headers = {"Cache-Control": "no-store"}
    if isinstance(result, bytes):
        return web.Response(body=result, content_type="image/png", headers=headers)
    return web.json_response(result, headers=headers)


async def preview_json_handler(request):
    return await _respond(request, preview_payload)


async def preview_png_handler(request):
    return await _respond(request, preview_png)


def options_payload() -> dict:
    """What web/klora.js reads once: each pattern's paper beta (it switches beta with the pattern) and
    the ranges of beta and map_steps."""
    from ..klora_core import options

    return {
        "version": 1,
        "pattern_beta": {pattern: options.pattern_beta(pattern) for pattern in options.PATTERNS},
        "beta": {"min": options.BETA.lo, "max": options.BETA.hi, "default": options.BETA.default},
        "map_steps": {"min": options.STEPS.lo, "max": options.STEPS.hi, "default": options.STEPS.default},
    }


async def options_handler(request):
    from aiohttp import web

    return web.json_response(options_payload(), headers={"Cache-Control": "no-store"})


def register(prompt_server=None) -> bool:
    """Add the routes to ComfyUI's PromptServer; False (and nothing done) when there is none."""
    if prompt_server is None:
        # Only a server that is already running counts: ComfyUI's main.py imports server.py and creates
        # the PromptServer before it loads custom nodes; tests that import the pack in-process have none.
        server = sys.modules.get("server")
        prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    routes = getattr(prompt_server, "routes", None)
    if routes is None:
        return False
    for path, handler in ((ROUTE_JSON, preview_json_handler), (ROUTE_PNG, preview_png_handler)):
        routes.get(path)(handler)
        routes.post(path)(handler)
    routes.get(ROUTE_OPTIONS)(options_handler)
    logger.debug("K-LoRA: preview routes %s and %s registered", ROUTE_JSON, ROUTE_PNG)
    return True


try:
    REGISTERED = register()
except Exception as _exc:  # a preview route must never stop the nodes from loading
    logger.warning("K-LoRA: preview route not registered (%s); the nodes work without it", _exc)
    REGISTERED = False
