"""QueryRoute serves a query-model endpoint without FastAPI's dependency solver: the same parameters, errors, checks and
OpenAPI operation as FastAPI's own route for the same endpoint."""

from typing import Annotated, Literal

import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field

from service.query_route import QueryRoute, query_model


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = Field(10, ge=1, le=100)
    name: str | None = Field(None, pattern=r"^[a-z]+$")
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    x: float | None = Field(None, ge=0.0, le=1.0)


async def needs_key(request: Request) -> None:
    if request.headers.get("x-key") != "k":
        raise HTTPException(401, "no key")


async def endpoint(params: Annotated[Params, Query()], request: Request) -> JSONResponse:
    return JSONResponse({"params": params.model_dump(), "path": request.url.path})


def app_with(route_class) -> FastAPI:
    router = APIRouter()
    router.add_api_route(
        "/q", endpoint, methods=["GET"], dependencies=[Depends(needs_key)], route_class_override=route_class
    )
    app = FastAPI()
    app.include_router(router)
    return app


QUERIES = [
    "",
    "n=5",
    "n=0",
    "n=101",
    "n=abc",
    "n=",
    "n=2.0",
    "n=2.5",
    "name=abc",
    "name=ABC",
    "flag=true",
    "flag=maybe",
    "mode=b",
    "mode=c",
    "x=0.5",
    "x=2",
    "x=nan",
    "unknown=1",
    "n=5&unknown=1&other=2",
    "n=0&x=9&mode=z",
]


@pytest.mark.parametrize("query", QUERIES)
def test_same_answers_as_fastapis_own_route(query):
    reference, lean = TestClient(app_with(None)), TestClient(app_with(QueryRoute))
    for headers in ({"x-key": "k"}, {}):  # with and without the route's check passing
        want, got = reference.get(f"/q?{query}", headers=headers), lean.get(f"/q?{query}", headers=headers)
        assert (got.status_code, got.json()) == (want.status_code, want.json())


def test_same_openapi_operation():
    assert app_with(QueryRoute).openapi() == app_with(None).openapi()


def test_a_repeated_name_is_refused():
    r = TestClient(app_with(QueryRoute)).get("/q?n=5&n=6", headers={"x-key": "k"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "n"]


def test_other_signatures_and_checks_needing_more_than_the_request_are_refused_at_start_up():
    async def two_models(params: Annotated[Params, Query()], other: Annotated[Params, Query()]):
        return None

    with pytest.raises(TypeError, match="two_models"):
        query_model(two_models)

    async def needs_more(request: Request, token: str) -> None:
        return None

    router = APIRouter()
    with pytest.raises(TypeError, match="needs_more"):
        router.add_api_route(
            "/q", endpoint, methods=["GET"], dependencies=[Depends(needs_more)], route_class_override=QueryRoute
        )
