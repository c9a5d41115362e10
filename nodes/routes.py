"""HTTP preview of a K-LoRA fusion: ``/klora/preview`` (JSON) and ``/klora/preview.png``.

The frontend extension (``web/klora.js``) calls these while the user edits a
"K-LoRA Fuse" node, so the selection map follows alpha, beta, pattern, scope,
steps and the two loaders' files/strengths without queueing a prompt.  No
model is needed: the two files are read with the project's one LoRA reader
(``klora_core.safe_load.load_tensors``, which the loader nodes and the command
line use too), grouped into ``{canonical module: (up, down)}`` by
``klora_core.lora_file.lora_modules`` and scored by ``klora_core.build_plan``.
Module names are the file reader's canonical names (``down_blocks_1_...``),
not ComfyUI's model keys, so the rows may be named and ordered slightly
differently from the node's own map; the decisions are the same wherever the
two readers pair the same weights (see README "See the fusion").

The request (GET query string, or POST with a JSON object body; parameters
subject, style, subject_strength, style_strength, alpha, beta, pattern, scope,
map_steps) and its validation are ``nodes/preview_params.py``.

Every problem with the request is a 400 with ``{"error": {"type", "param",
"message"}}``; files that cannot be fused (no shared layer, corrupt file) are
a 422 with the same shape.  Scores are computed once per pair of file
*contents* (SHA-256) and scope, at strength 1, and kept in a bounded LRU
cache; strengths and the schedule are applied afterwards, so dragging a
slider never rescores.  Scoring runs in a worker thread so the server's event
loop stays responsive.

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
import threading
from collections import OrderedDict
from dataclasses import dataclass

from ..klora_core import schedule
from ..klora_core.errors import KLoRAError
from .preview_params import SCOPE_ATTENTION, PreviewParams, PreviewRequestError, parse_params

logger = logging.getLogger(__name__)

ROUTE_JSON = "/klora/preview"
ROUTE_PNG = "/klora/preview.png"

MAX_BODY_BYTES = 64 * 1024

#: Pairs of files (x scope) whose scores are kept.
CACHE_PAIRS = 16


# ---------------------------------------------------------------- scoring + cache


@dataclass(frozen=True)
class _Scored:
    """Scores of a file pair at strength 1 (one cache entry)."""

    details: dict  # {canonical module: WeightScore}, in natural model order
    subject_only: tuple
    style_only: tuple
    outside_scope: int  # shared diffusion-model modules outside the scope
    subject_modules: int
    style_modules: int


_CACHE: "OrderedDict[tuple, _Scored]" = OrderedDict()
_CACHE_LOCK = threading.Lock()
_SCORE_LOCK = threading.Lock()  # one scoring at a time (bounded memory: two files read at once)
_STATS = {"hits": 0, "misses": 0}


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
        _STATS.update(hits=0, misses=0)


def cache_stats() -> dict:
    with _CACHE_LOCK:
        return {"entries": len(_CACHE), "capacity": CACHE_PAIRS, **_STATS}


def _full_path(name: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path("loras", name)
    if path is None or not os.path.isfile(path):
        raise PreviewRequestError(None, f"LoRA '{name}' was listed but cannot be found any more; refresh",
                                  kind="unknown_lora")
    return path


def _modules(path: str, label: str) -> dict:
    from ..klora_core.lora_file import lora_modules
    from ..klora_core.safe_load import load_tensors

    return lora_modules(load_tensors(path, label), 1.0, source=label)


def _score(subject_path: str, style_path: str, p: PreviewParams) -> _Scored:
    from ..klora_core.weight_keys import is_attention_name
    from ..klora_core.plan import build_plan

    subject = _modules(subject_path, f"subject LoRA '{p.subject}'")
    style = _modules(style_path, f"style LoRA '{p.style}'")
    # Text-encoder modules are never switched by the node (it patches the diffusion model only).
    subject = {k: v for k, v in subject.items() if not k.startswith(("te1_", "te2_"))}
    style = {k: v for k, v in style.items() if not k.startswith(("te1_", "te2_"))}
    shared = [k for k in subject if k in style]
    if not shared:
        raise KLoRAError(f"subject LoRA '{p.subject}' and style LoRA '{p.style}' share no diffusion-model "
                         "layer: they were trained for different models (or use names that cannot be paired)")
    if p.scope == SCOPE_ATTENTION:
        in_scope = [k for k in shared if is_attention_name(k)]
        if not in_scope:
            raise KLoRAError(f"the LoRAs share {len(shared)} layers but no attention projection; "
                             "set scope to 'all shared weights'")
    else:
        in_scope = shared
    kept = set(in_scope)
    plan = build_plan({k: subject[k] for k in in_scope}, {k: style[k] for k in in_scope})  # scores only; schedule later
    return _Scored(
        details=dict(plan.details),
        subject_only=tuple(k for k in subject if k not in style),
        style_only=tuple(k for k in style if k not in subject),
        outside_scope=len([k for k in shared if k not in kept]),
        subject_modules=len(subject),
        style_modules=len(style),
    )


def _cached(key: tuple):
    """The cached scores for ``key`` (then the most recently used entry, counted as a hit), or None."""
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            _STATS["hits"] += 1
        return hit


def scored_pair(p: PreviewParams):
    """``(_Scored, cache_hit)`` for the request's files and scope (strength-1 scores, cached)."""
    from .handles import content_sha256

    subject_path, style_path = _full_path(p.subject), _full_path(p.style)
    key = (content_sha256(subject_path), content_sha256(style_path), p.scope)
    hit = _cached(key)
    if hit is not None:
        return hit, True
    with _SCORE_LOCK:
        hit = _cached(key)  # computed by a concurrent request meanwhile?
        if hit is not None:
            return hit, True
        scored = _score(subject_path, style_path, p)
        with _CACHE_LOCK:
            _STATS["misses"] += 1
            _CACHE[key] = scored
            while len(_CACHE) > CACHE_PAIRS:
                _CACHE.popitem(last=False)
    return scored, False


def make_plan(p: PreviewParams):
    """``(plan or None, scored, cache_hit, notes)``; plan None when a strength is 0."""
    from ..klora_core.plan import plan_from_scores, scores_at_strengths

    scored, hit = scored_pair(p)
    notes = []
    if p.subject_strength == 0.0 or p.style_strength == 0.0:
        notes.append("one strength is 0: K-LoRA has nothing to balance, so every weight takes the other LoRA")
        return None, scored, hit, notes
    details = scores_at_strengths(scored.details, p.subject_strength, p.style_strength)
    plan = plan_from_scores(details, scored.subject_only, scored.style_only, p.alpha, p.resolved_beta, p.pattern)
    return plan, scored, hit, notes


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


async def _respond(request, render):
    from aiohttp import web

    loop = asyncio.get_running_loop()
    try:
        params = await _read_params(request)
        result = await loop.run_in_executor(None, render, params)
    except PreviewRequestError as exc:
        return web.json_response(exc.payload(), status=exc.status)
    except KLoRAError as exc:
        return web.json_response({"error": {"type": "cannot_fuse", "message": str(exc)}}, status=422)
    except Exception as exc:  # never let the frontend see an HTML 500 page
        logger.exception("K-LoRA preview failed")
        return web.json_response({"error": {"type": "internal", "message": f"{type(exc).__name__}: {exc}"}},
                                 status=500)
    headers = {"Cache-Control": "no-store"}
    if isinstance(result, bytes):
        return web.Response(body=result, content_type="image/png", headers=headers)
    return web.json_response(result, headers=headers)


async def preview_json_handler(request):
    return await _respond(request, preview_payload)


async def preview_png_handler(request):
    return await _respond(request, preview_png)


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
    logger.debug("K-LoRA: preview routes %s and %s registered", ROUTE_JSON, ROUTE_PNG)
    return True


try:
    REGISTERED = register()
except Exception as _exc:  # a preview route must never stop the nodes from loading
    logger.warning("K-LoRA: preview route not registered (%s); the nodes work without it", _exc)
    REGISTERED = False
