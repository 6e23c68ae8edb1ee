"""`POST /images/generations` (JSON with URLs or base64, or the image itself) and
`GET /images/files/{id}.png`, where the URLs point (no API key: the unguessable URL is the key)."""

from __future__ import annotations

import base64
import contextlib
import functools
import socket
from typing import TYPE_CHECKING, Any

import ray
from fastapi import APIRouter, Depends, Request, Response
from ray import serve

from voltage_ray.config import ModelConfig
from voltage_ray.deployments import image_store
from voltage_ray.errors import BadRequest, NotFound, ServiceUnavailable, shown
from voltage_ray.ingress import failover, guards
from voltage_ray.ingress.deps import get_config, get_meter, get_models, get_principal
from voltage_ray.ingress.meter import Meter
from voltage_ray.ingress.served_models import Models
from voltage_ray.protocol.images import ImageData, ImageGenerationRequest, ImageGenerationResponse

if TYPE_CHECKING:
    from voltage_ray.limits.limiter import Principal

router = APIRouter(tags=["Images"])

GENERATIONS = "/images/generations"
FILES = "/images/files"
JSON = "application/json"
OFFERS = (JSON, "image/png", "image/jpeg")  # on equal preference, the first wins


def negotiate(accept: str | None) -> str:
    """The response type for an Accept header: JSON unless it prefers image/png or image/jpeg."""
    ranges: list[tuple[str, float]] = []
    for part in (accept or "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if not media:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        ranges.append((media.lower(), q))
    best, best_q = JSON, 0.0
    for offer in OFFERS:
        q = _quality(offer, ranges)
        if q > best_q:
            best, best_q = offer, q
    return best


def _quality(offer: str, ranges: list[tuple[str, float]]) -> float:
    """q of the most specific range matching ``offer`` (type/sub over type/* over */*)."""
    kind = offer.split("/")[0]
    best: tuple[int, float] = (-1, 0.0)
    for media, q in ranges:
        specificity = {offer: 2, f"{kind}/*": 1, "*/*": 0}.get(media, -1)
        if specificity > best[0]:
            best = (specificity, q)
    return best[1]


async def _store_call(request: Request, method: str, *args: Any) -> Any:
    """Call this application's image store actor: created and configured on a replica's first
    use, and once more if it died for good (its images are gone then; URLs to them 404)."""
    state = request.app.state
    for attempt in range(2):
        store = getattr(state, "image_store", None)
        try:
            if store is None:
                config = get_config(request).image_store
                app_name = serve.get_replica_context().app_name
                store = image_store.get_or_create_store(app_name, config.ttl_s, config.max_bytes)
                await image_store.call(store.configure, config.ttl_s, config.max_bytes)
                state.image_store = store
            return await image_store.call(getattr(store, method), *args)
        except ServiceUnavailable as exc:
            if attempt or not isinstance(exc.__cause__, ray.exceptions.ActorDiedError):
                raise
            state.image_store = None


LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


@functools.cache
def own_hosts() -> frozenset[str]:
    """This node's names and addresses: Host headers that name the service itself."""
    names = set(LOCAL_HOSTS)
    with contextlib.suppress(Exception):
        names.add(socket.gethostname())
        names.add(socket.getfqdn())
        names.add(ray.util.get_node_ip_address())
    return frozenset(n.lower() for n in names if n)


def _base_url(request: Request) -> str:
    """Where image URLs point: ``public_base_url``, else the request's own base URL when its
    Host is one this service may name (a 400 otherwise: a forged Host never reaches a URL)."""
    config = get_config(request).image_store
    if config.public_base_url:
        return config.public_base_url
    host = request.url.hostname or ""
    allowed = own_hosts() | {h.lower() for h in config.allowed_hosts}
    if host.lower().strip("[]") not in allowed:
        raise BadRequest(
            f"The Host '{shown(host)}' is not one this service's image URLs may name: set "
            "image_store.public_base_url, or add it to image_store.allowed_hosts (or ask for "
            "response_format b64_json)",
            details={"param": "Host"},
        )
    return str(request.base_url)


def _file_url(request: Request, base: str, image_id: str) -> str:
    """Absolute URL of a stored image, under the API prefix the request came in on."""
    root = request.scope.get("app_root_path", request.scope.get("root_path", ""))
    path = request.scope["path"]  # includes the root path (a Serve route_prefix), if any
    prefix = path.removeprefix(root).removesuffix(GENERATIONS)  # "/v1" or "/api/voltage/v1"
    return f"{base.rstrip('/')}{prefix}{FILES}/{image_id}.png"


@router.post(
    GENERATIONS,
    summary="Create image",
    response_model=ImageGenerationResponse,
    response_model_exclude_none=True,
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}},
)
async def create_image(
    body: ImageGenerationRequest,
    request: Request,
    principal: Principal = Depends(get_principal),
    models: Models = Depends(get_models),
    meter: Meter = Depends(get_meter),
) -> Response:
    default = models.default("images")
    if body.model is None and default is None:
        raise NotFound("No images model is served")
    model = body.model or default.id  # type: ignore[union-attr]
    config, handle = models.resolve(model, "images")  # 404 for an unknown model
    request.state.model = config.id
    limits = models.config.request_limits
    guards.at_most(len(body.prompt), limits.images_max_prompt_chars, "The prompt length")
    media = negotiate(request.headers.get("accept"))
    if media != JSON and body.n > 1:
        raise BadRequest(
            f"n is {body.n}, but an {media} response holds one image: send n=1, or accept "
            f"{JSON} to receive {body.n} images",
            details={"param": "n"},
        )
    output = "jpeg" if media == "image/jpeg" else "png"
    base = _base_url(request) if media == JSON and body.response_format != "b64_json" else ""
    tries = failover.Tries.at(request.url.path)

    ticket = await meter.admit(principal, endpoint=request.url.path, model=model, images=body.n)
    tenant = ticket.tenant()

    async def generate(target: ModelConfig) -> list[bytes]:
        target_handle = handle if target.id == config.id else models.handles[target.id]
        call = target_handle.generate.remote(body, output, tenant)
        return await failover.result(call)

    images: list[bytes] = await guards.within(
        failover.call(models, config, tries, generate, key=principal.key_id, meter=meter),
        limits.images_timeout_s,
        "Image generation",
    )
    await meter.record(ticket, images=len(images))
    models.metrics.images.inc(len(images), tags={"model": config.id, "plan": principal.plan})
    headers = {**ticket.headers, **tries.headers()}
    if media != JSON:
        return Response(images[0], media_type=media, headers=headers)
    if body.response_format == "b64_json":
        data = [ImageData(b64_json=base64.b64encode(image).decode()) for image in images]
    else:
        ids = await _store_call(request, "put", images)
        data = [ImageData(url=_file_url(request, base, image_id)) for image_id in ids]
    response = ImageGenerationResponse(data=data)
    return Response(response.model_dump_json(exclude_none=True), media_type=JSON, headers=headers)


@router.get(
    FILES + "/{name}",
    summary="Fetch a generated image",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
async def get_image_file(name: str, request: Request) -> Response:
    image_id, _, extension = name.partition(".")
    found = None
    if extension == "png" and image_store.ID_PATTERN.fullmatch(image_id):
        found = await _store_call(request, "get", image_id)
    if found is None:
        raise NotFound("Image not found or expired")
    data, seconds_left = found
    return Response(
        data,
        media_type="image/png",
        headers={"Cache-Control": f"private, max-age={int(seconds_left)}"},
    )
