"""The endpoint table: one declaration per operation gives the Starlette route, request
validation, the problem responses, Idempotency-Key replay and the OpenAPI entry."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from billing_core.billing import idempotency
from billing_core.clock import Clock
from billing_core.db.unit_of_work import Database, UnitOfWork
from billing_core.errors import Forbidden, QuotaError
from billing_core.settings import Settings
from control_plane.api.problems import (
    PROBLEM_JSON,
    TITLES,
    field_errors,
    from_error,
    problem,
)
from control_plane.api.schemas import Problem

_PATH_PARAM = re.compile(r"{(\w+)}")
MAX_BODY_BYTES = 1_000_000


@dataclass(frozen=True, slots=True)
class Call:
    """What a handler gets: validated input, the call's unit of work (one transaction;
    committed when the handler returns) and the database for work beyond it."""

    request: Request
    uow: UnitOfWork
    db: Database
    settings: Settings
    now: datetime
    actor: str
    path: dict[str, str]
    body: Any
    query: Any


Handler = Callable[[Call], Awaitable[BaseModel | Response]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    handler: Handler
    response: type[BaseModel]
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    status: int = 200
    errors: tuple[int, ...] = ()
    idempotent: bool = False  # accepts Idempotency-Key and replays the first response
    csv: bool = False  # also answers text/csv
    description: str = ""
    admin_only: bool = False  # a read key may not call it either (every change is admin-only)
    path_params: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path_params", tuple(_PATH_PARAM.findall(self.path)))

    @property
    def needs_admin(self) -> bool:
        return self.admin_only or self.method != "GET"


class _BadInput(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


async def _parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise _BadInput(problem(422, f"the body is larger than {MAX_BODY_BYTES} bytes"))
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if ctype not in ("application/json", "") and not ctype.endswith("+json"):
        raise _BadInput(problem(415, "send the body as application/json"))
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise _BadInput(problem(400, "the body is not valid JSON")) from None
        raise _BadInput(
            problem(422, "the body does not match the schema", errors=field_errors(exc.errors()))
        ) from None


def _parse_query(request: Request, model: type[BaseModel]) -> BaseModel:
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as exc:
        raise _BadInput(
            problem(
                422,
                "the query parameters are invalid",
                errors=field_errors(exc.errors()),
            )
        ) from None


def _request_hash(ep: Endpoint, path: dict[str, str], body: BaseModel | None) -> str:
    payload = {
        "op": ep.operation_id,
        "path": path,
        "body": body.model_dump(mode="json") if body else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def route(ep: Endpoint, clock: Clock) -> Route:
    async def endpoint(request: Request) -> Response:
        if ep.needs_admin and request.scope.get("state", {}).get("scope") != "admin":
            return from_error(Forbidden("this API key may only read: changes need an admin key"))
        path = {name: str(request.path_params[name]) for name in ep.path_params}
        if any("\x00" in v or len(v) > 255 for v in path.values()):
            return problem(404, "no such resource")
        try:
            body = await _parse_body(request, ep.body) if ep.body else None
            query = _parse_query(request, ep.query) if ep.query else None
        except _BadInput as bad:
            return bad.response
        app = request.app
        db: Database = app.state.db
        actor: str = request.scope.get("state", {}).get("actor", "anonymous")
        key = request.headers.get("idempotency-key") if ep.idempotent else None
        try:
            async with db.transaction() as uow:
                call = Call(
                    request, uow, db, app.state.settings, clock.now(), actor, path, body, query
                )
                if key is None:
                    return _respond(ep, await ep.handler(call))
                digest = _request_hash(ep, path, body)
                stored = await idempotency.claim(uow, actor, key, digest)
                if stored is not None:
                    return JSONResponse(
                        stored[1], status_code=stored[0], headers={"Idempotent-Replayed": "true"}
                    )
                result = await ep.handler(call)
                response = _respond(ep, result)
                assert isinstance(result, BaseModel)
                body_json = result.model_dump(mode="json")
                await idempotency.remember(
                    uow, actor, key, digest, response.status_code, body_json, call.now
                )
                return response
        except QuotaError as exc:
            return from_error(exc)

    return Route(ep.path, endpoint, methods=[ep.method], name=ep.operation_id)


def _respond(ep: Endpoint, result: BaseModel | Response) -> Response:
    if isinstance(result, Response):
        return result
    return JSONResponse(result.model_dump(mode="json"), status_code=ep.status)


# --- OpenAPI -------------------------------------------------------------------------------


def _query_parameters(model: type[BaseModel], defs: dict[str, Any]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    defs.update(schema.pop("$defs", {}))
    required = set(schema.get("required", []))
    return [
        {"name": name, "in": "query", "required": name in required, "schema": prop}
        for name, prop in schema.get("properties", {}).items()
    ]


def openapi_document(endpoints: list[Endpoint], title: str, version: str) -> dict[str, Any]:
    models: list[tuple[type[BaseModel], Any]] = [(Problem, "serialization")]
    for ep in endpoints:
        models.append((ep.response, "serialization"))
        if ep.body:
            models.append((ep.body, "validation"))
    keys, top = models_json_schema(
        list(dict.fromkeys(models)), ref_template="#/components/schemas/{model}"
    )
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    problem_ref = {"$ref": keys[(Problem, "serialization")]["$ref"]}
    paths: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        params = [
            {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
            for n in ep.path_params
        ]
        if ep.query:
            params += _query_parameters(ep.query, schemas)
        if ep.idempotent:
            params.append(
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "description": "replays the first response for the same key",
                    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                }
            )
        content: dict[str, Any] = {
            "application/json": {"schema": {"$ref": keys[(ep.response, "serialization")]["$ref"]}}
        }
        if ep.csv:
            content["text/csv"] = {"schema": {"type": "string"}}
        codes = {401, 422, 429, 503, *ep.errors} | ({403} if ep.needs_admin else set())
        if ep.query is not None and "cursor" in ep.query.model_fields:
            codes.add(404)  # a cursor the API never returned addresses no page
        if ep.body:
            codes |= {400, 415}
        responses: dict[str, Any] = {str(ep.status): {"description": "OK", "content": content}}
        for code in sorted(codes):
            responses[str(code)] = {
                "description": problem_title(code),
                "content": {PROBLEM_JSON: {"schema": problem_ref}},
            }
        op: dict[str, Any] = {
            "operationId": ep.operation_id,
            "summary": ep.summary,
            "tags": [ep.tag],
            "parameters": params,
            "responses": responses,
            "security": [{"bearer": []}],
        }
        if ep.description:
            op["description"] = ep.description
        if ep.body:
            op["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": keys[(ep.body, "validation")]["$ref"]}}
                },
            }
        paths.setdefault(ep.path, {})[ep.method.lower()] = op
    _link_created_resources(endpoints, paths)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _link_created_resources(endpoints: list[Endpoint], paths: dict[str, Any]) -> None:
    """OpenAPI links from each operation that creates a resource (201) to every operation
    whose path names the resource's id: a client (or a stateful test) goes from a created
    plan or tenant to what can be done with it."""
    for ep in endpoints:
        if ep.status != 201:
            continue
        fields = set(ep.response.model_fields)
        links = {
            other.operation_id: {
                "operationId": other.operation_id,
                "parameters": {p: f"$response.body#/{p}" for p in other.path_params},
            }
            for other in endpoints
            if other is not ep
            and other.path_params
            and set(other.path_params) <= fields
            and not set(ep.path_params) & set(other.path_params)
        }
        if links:
            paths[ep.path][ep.method.lower()]["responses"][str(ep.status)]["links"] = links


def problem_title(code: int) -> str:
    return TITLES.get(code, ("error", "Error"))[1]
