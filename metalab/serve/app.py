"""The HTTP service (FastAPI): per-tenant adapters over one served run, persisted in the registry.

Every ``/v1`` request carries an API key (``Authorization: Bearer mlk_…`` or ``X-API-Key``); a
tenant only ever sees its own adapters — another tenant's id answers 404, exactly like an id that
does not exist. Errors are JSON ``{"error": {"status", "code", "message", "field"}}`` with the
field at fault named. Writes validate and fit the adapter *before* the registry transaction, so a
rejected request leaves nothing behind.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from metalab.errors import InputError, MetalabError, StorageError
from metalab.serve import schemas
from metalab.serve.guard import RequestGuard, json_error
from metalab.serve.limits import Limits
from metalab.serve.model import ServedRun
from metalab.store.registry import Example, Registry, Tenant

log = logging.getLogger("metalab.serve")
PAGE = Path(__file__).with_name("page.html")
MODALITIES = ("text", "image", "array")  #: kinds of run; an example carries the field of its kind (requests: plural)
ERROR_RESPONSES = {code: {"model": schemas.ErrorOut} for code in (401, 404, 409, 413, 422, 429, 503)}
#: OpenAPI links: the id a create returns feeds the other operations (clients and fuzzers follow them)
CREATED_LINKS = {201: {"description": "The adapter, stored.", "links": {
    name: {"operationId": op, "parameters": {"adapter_id": "$response.body#/id"}}
    for name, op in (("GetAdapter", "get_adapter"), ("Predict", "predict"), ("AddExamples", "add_examples"),
                     ("DeleteAdapter", "delete_adapter"))}}}


error_response = json_error  #: ``{"error": {"status", "code", "message", "field"}}`` (shared with the guard)


def create_app(run_dir: str | Path, db: str | Path, device: str = "cpu", rate_limit: float | None = None,
               max_body: int | None = None, served: ServedRun | None = None, limits: Limits | None = None) -> RequestGuard:
    """The service over ``run_dir`` with adapters in the registry ``db``, behind its
    :class:`~metalab.serve.guard.RequestGuard` (``.app`` is the FastAPI app). ``limits`` default to
    :class:`~metalab.serve.limits.Limits`; ``rate_limit`` and ``max_body`` replace two of them."""
    limits = (limits or Limits()).with_(rate_limit=rate_limit, max_body=max_body)
    served = served or ServedRun(run_dir, device)
    registry = Registry(db)
    app = FastAPI(title="metalab serve", version="1",
                  description="Few-shot adapters per tenant over a meta-trained metalab run. "
                              "Send a few labelled examples, get a personal classifier, predict.")
    app.state.served, app.state.registry = served, registry
    bearer = HTTPBearer(auto_error=False, description="An API key from `metalab keys create TENANT`.")

    # ---- errors: one JSON shape, the field named --------------------------------------------------

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return error_response(422, "invalid_json", "The request body is not valid JSON; send a JSON object "
                                                       "(Content-Type: application/json).", "body")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        field = ".".join(loc) or "body"
        message = f"Field '{field}': {first['msg'].rstrip('.')}." if loc else f"The request body is invalid: {first['msg'].rstrip('.')}; send a JSON object as the OpenAPI spec (/openapi.json) describes."
        return error_response(422, "invalid_input", message, field)

    @app.exception_handler(InputError)
    async def bad_input(request: Request, exc: InputError):
        return error_response(422, "invalid_input", str(exc), exc.field)

    @app.exception_handler(OverBudget)
    async def over_budget(request: Request, exc: OverBudget):
        return error_response(413, "over_budget", str(exc), exc.field)

    @app.exception_handler(StorageError)
    async def storage_failed(request: Request, exc: StorageError):  # disk full or read-only: the client may retry
        log.error("registry write failed: %s", exc)
        return error_response(503, "storage_unavailable", str(exc), headers={"Retry-After": "30"})

    @app.exception_handler(MetalabError)
    async def metalab_error(request: Request, exc: MetalabError):
        return error_response(422, "invalid_input", str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        codes = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 409: "conflict", 429: "rate_limited"}
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
        return error_response(exc.status_code, codes.get(exc.status_code, "error"), message, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "Internal error; nothing was changed. The server log has the details.")

    # ---- auth ----------------------------------------------------------------------------------

    def tenant(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Tenant:
        """The tenant the guard authenticated from the headers, before the body was read."""
        found = request.scope.get("state", {}).get("metalab_tenant")
        if found is None:  # only reachable when the app runs without its guard
            raise HTTPException(401, "No valid API key; send 'Authorization: Bearer <key>' (create one with `metalab keys create TENANT`).")
        return found

    def owned(adapter_id: str, who: Tenant):
        record = registry.get_adapter(who, served.key, adapter_id)
        if record is None:  # absent and not-yours look the same: ids do not leak
            raise HTTPException(404, f"No adapter '{adapter_id}' for this key; list yours with GET /v1/adapters.")
        return record

    # ---- routes --------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/healthz", response_model=schemas.Health, tags=["service"], operation_id="healthz")
    def healthz() -> dict:
        """Liveness and what is served (no key needed)."""
        return {"status": "ok", **served.describe(), "adapters": registry.count_adapters(served.key)}

    @app.post("/v1/adapters", status_code=201, response_model=schemas.AdapterOut, responses={**ERROR_RESPONSES, **CREATED_LINKS},
              tags=["adapters"], operation_id="create_adapter")
    def create_adapter(body: schemas.AdapterCreate, who: Tenant = Depends(tenant)) -> dict:
        """Adapt the run to a few labelled examples; the adapter and its examples are stored."""
        examples = check_examples(body.examples, served.modality)
        labels = check_labels(body.labels, examples, limits.max_labels)
        check_budget(served, limits, [e.text for e in examples], [e.image for e in examples], "examples")
        examples = served.example_features(decode(examples, served))
        threshold = body.threshold if body.threshold is not None else served.default_threshold(body.head, len(labels))
        # fails before anything is written
        adapter = served.fit(labels, body.head, threshold, examples, body.names_as_examples, body.lexical_weight)
        record = registry.create_adapter(who, served.key, body.name, served.modality, body.head, threshold, labels, examples,
                                         body.names_as_examples, body.lexical_weight)
        served.remember(record, adapter)
        return record.public()

    @app.get("/v1/adapters", response_model=schemas.AdapterList, responses=ERROR_RESPONSES, tags=["adapters"], operation_id="list_adapters")
    def list_adapters(who: Tenant = Depends(tenant)) -> dict:
        return {"adapters": [r.public() for r in registry.list_adapters(who, served.key)]}

    @app.get("/v1/adapters/{adapter_id}", response_model=schemas.AdapterOut, responses=ERROR_RESPONSES, tags=["adapters"], operation_id="get_adapter")
    def get_adapter(adapter_id: str, who: Tenant = Depends(tenant)) -> dict:
        return owned(adapter_id, who).public()

    @app.delete("/v1/adapters/{adapter_id}", status_code=204, responses=ERROR_RESPONSES, tags=["adapters"], operation_id="delete_adapter")
    def delete_adapter(adapter_id: str, who: Tenant = Depends(tenant)) -> Response:
        if not registry.delete_adapter(who, served.key, adapter_id):
            owned(adapter_id, who)  # raises the 404
        served.forget(adapter_id)
        return Response(status_code=204)

    @app.post("/v1/adapters/{adapter_id}/examples", response_model=schemas.AdapterOut, responses=ERROR_RESPONSES, tags=["adapters"], operation_id="add_examples")
    def add_examples(adapter_id: str, body: schemas.ExamplesAdd, who: Tenant = Depends(tenant)) -> dict:
        """Add labelled examples (new labels allowed) and re-adapt."""
        record = owned(adapter_id, who)
        if record.examples + len(body.examples) > schemas.MAX_EXAMPLES_PER_ADAPTER:
            raise InputError("examples", f"Adapter '{adapter_id}' has {record.examples} examples; adding {len(body.examples)} "
                                         f"would pass the limit of {schemas.MAX_EXAMPLES_PER_ADAPTER}; create a new adapter instead.")
        checked = check_examples(body.examples, served.modality)
        labels = record.labels + [l for l in dict.fromkeys(e.label for e in checked) if l not in record.labels]
        if len(labels) > limits.max_labels:
            raise InputError("examples", f"Adapter '{adapter_id}' would have {len(labels)} labels with these examples, over "
                                         f"the limit of {limits.max_labels} (metalab serve --max-labels); create another adapter instead.")
        check_budget(served, limits, [e.text for e in checked], [e.image for e in checked], "examples")
        new = served.example_features(decode(checked, served))
        adapter = served.fit(labels, record.head, record.threshold, registry.examples(record.id, record.version) + new,
                             record.names_as_examples, record.lexical_weight)
        updated = registry.add_examples(who, served.key, adapter_id, labels, new, record.version)
        if updated is None:
            raise HTTPException(409, f"Adapter '{adapter_id}' changed or was deleted while adding; send the request again.")
        served.remember(updated, adapter)
        return updated.public()

    @app.post("/v1/adapters/{adapter_id}/predict", response_model=schemas.PredictOut, responses=ERROR_RESPONSES, tags=["predict"], operation_id="predict")
    def predict(adapter_id: str, body: schemas.PredictIn, who: Tenant = Depends(tenant)) -> dict:
        """Labels, scores and (text) the out-of-scope flag for a batch of inputs."""
        record = owned(adapter_id, who)
        wanted = served.modality + "s"
        others = [f + "s" for f in MODALITIES if f != served.modality]
        if any(getattr(body, o) is not None for o in others) or getattr(body, wanted) is None:
            raise InputError(wanted, f"This adapter's run takes {served.modality} inputs; send them as '{wanted}' "
                                     f"(and no {' or '.join(repr(o) for o in others)}).")
        if served.modality == "text":
            blank = next((i for i, t in enumerate(body.texts) if not t.strip()), None)
            if blank is not None:
                raise InputError(f"texts.{blank}", f"Field 'texts.{blank}' is blank; send non-empty texts.")
            check_budget(served, limits, body.texts, None, "texts")
            x = served.features(texts=body.texts)
        elif served.modality == "array":
            x = served.features(arrays=body.arrays)
        else:
            images = served.decode_images(body.images)
            check_budget(served, limits, None, images, "images")
            x = served.features(images=images)
        adapter = served.adapter(record, registry.examples)
        out = []
        for p in adapter.predict_inputs(x, body.texts):
            ranked = sorted(p.scores.items(), key=lambda kv: -kv[1])[: body.top_k]
            out.append({"label": p.label, "scores": dict(ranked), "out_of_scope": p.out_of_scope})
        return {"adapter": record.id, "version": record.version, "predictions": out}

    generated_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            narrow_spec_to_modality(generated_openapi(), served.modality)
        return app.openapi_schema

    app.openapi = openapi
    app.state.limits = limits
    return RequestGuard(app, registry, limits)


def narrow_spec_to_modality(spec: dict, modality: str) -> dict:
    """The generated OpenAPI ``spec``, changed in place to what this server accepts: a text run's
    examples and inputs are texts (required, not blank), an image run's images, an array run's
    arrays of numbers, each without the other kinds' fields; the text-only options and text request
    examples only on a text run. The pydantic models stay modality-neutral (one library, three kinds
    of run); the checks in the routes are the same rules."""
    wanted = modality
    models = spec["components"]["schemas"]
    for name, suffix in (("ExampleIn", ""), ("PredictIn", "s")):
        model = models[name]
        for other in MODALITIES:
            if other != wanted:
                model["properties"].pop(other + suffix)
        field = model["properties"][wanted + suffix]
        field.update(next(branch for branch in field.pop("anyOf") if branch.get("type") != "null"))
        model["required"] = [*model.get("required", []), wanted + suffix]
    example = models["ExampleIn"]["properties"]
    example["label"]["pattern"] = r"\S"  # check_examples refuses blank labels (and blank texts)
    if modality == "text":
        example["text"]["pattern"] = r"\S"
    else:
        for option in ("names_as_examples", "lexical_weight"):
            models["AdapterCreate"]["properties"].pop(option)
        for name in ("AdapterCreate", "ExamplesAdd", "PredictIn"):
            models[name].pop("examples", None)
    return spec


def check_examples(examples: list[schemas.ExampleIn], modality: str) -> list[schemas.ExampleIn]:
    """Each example has exactly the input its run takes, non-blank."""
    wanted = modality
    others = [f for f in MODALITIES if f != wanted]
    for i, e in enumerate(examples):
        if any(getattr(e, o) is not None for o in others) or getattr(e, wanted) is None:
            raise InputError(f"examples.{i}.{wanted}", f"Field 'examples.{i}.{wanted}' is required (this run takes {modality}; "
                                                     f"leave {' and '.join(repr(o) for o in others)} out).")
        if modality == "text" and not e.text.strip():
            raise InputError(f"examples.{i}.text", f"Field 'examples.{i}.text' is blank; send a non-empty text.")
        if not e.label.strip():
            raise InputError(f"examples.{i}.label", f"Field 'examples.{i}.label' is blank; give every example a label.")
    return examples


class OverBudget(InputError):
    """A request asks for more decoding or encoding work than one request may (413)."""


def check_budget(served: ServedRun, limits: Limits, texts: list | None, images: list | None, field: str) -> None:
    """The request's whole work, before any of it is done: text characters to encode (text runs) and
    image pixels to decode (image runs, from each image's header), each within its per-request budget."""
    if served.modality == "text" and texts:
        chars = sum(len(t or "") for t in texts)
        if chars > limits.max_request_chars:
            raise OverBudget(field, f"The request's texts hold {chars} characters, over the per-request budget of "
                                    f"{limits.max_request_chars} (metalab serve --max-request-chars); send fewer or shorter texts per request.")
    if served.modality == "image" and images:
        if images and isinstance(images[0], str):
            images = served.decode_images(images, field + ".{}.image")
        pixels = served.image_pixels(images, field + ".{}" + (".image" if field == "examples" else ""))
        if pixels > limits.max_request_pixels:
            raise OverBudget(field, f"The request's images hold {pixels} pixels, over the per-request budget of "
                                    f"{limits.max_request_pixels} (metalab serve --max-request-pixels); send fewer or smaller images per request.")


def check_labels(declared: list[str] | None, examples: list[schemas.ExampleIn], max_labels: int = schemas.MAX_LABELS) -> list[str]:
    """The adapter's labels: the declared ones (each with ≥ 1 example), else the examples' labels in
    order; at most ``max_labels`` however they arrive."""
    used = list(dict.fromkeys(e.label for e in examples))
    if len(used) > max_labels or (declared is not None and len(declared) > max_labels):
        field, count = ("labels", len(declared)) if declared is not None and len(declared) > max_labels else ("examples", len(used))
        raise InputError(field, f"The request carries {count} labels, over the limit of {max_labels} per adapter "
                                "(metalab serve --max-labels); split them across adapters.")
    if declared is None:
        if len(used) < 2:
            raise InputError("examples", f"The examples carry {len(used)} label; an adapter needs at least 2 labels.")
        return used
    if len(set(declared)) != len(declared):
        dup = next(l for l in declared if declared.count(l) > 1)
        raise InputError("labels", f"Label '{dup}' appears twice in 'labels'; list each label once.")
    for i, e in enumerate(examples):
        if e.label not in declared:
            raise InputError(f"examples.{i}.label", f"Field 'examples.{i}.label' is '{e.label}', which is not in 'labels'; add it there or fix the example.")
    for j, label in enumerate(declared):
        if label not in used:
            raise InputError(f"labels.{j}", f"Label '{label}' has no examples; add at least one example for it or remove it from 'labels'.")
    return list(declared)


def decode(examples: list[schemas.ExampleIn], served: ServedRun) -> list[Example]:
    if served.modality == "text":
        return [Example(e.label, text=e.text) for e in examples]
    if served.modality == "array":  # the numbers are the run's input: they go straight into features
        x = served.features(arrays=[e.array for e in examples], field="examples.{}.array")
        return [Example(e.label, features=row.numpy().tobytes()) for e, row in zip(examples, x)]
    images = served.decode_images([e.image for e in examples], "examples.{}.image")
    return [Example(e.label, image=b) for e, b in zip(examples, images)]
