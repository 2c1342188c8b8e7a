"""A FastAPI route class for the endpoints that cost compute: `async def f(params: Annotated[M, Query()], request)`.

FastAPI documents such a route from its signature as usual (every field of M a query parameter). It serves it
without its per-request dependency solver: the query string is validated by pydantic in one call and the route's
dependencies (each a check taking only the request, e.g. the API key) are awaited in order. The solver re-derives
every field's annotation, alias and cache key on each request: measured on /sample, the app's own work per request
(middleware, routing, validation, response; compute stubbed) went from 233 to 113 us, and in the server right after
a 40-step job (caches cold) the solver alone had taken ~0.28 ms, a tenth of a 2-evaluation student's request
(bench/results/distillation_speed.md). Same inputs, same errors: a RequestValidationError with each pydantic error
located at ("query", name), as FastAPI raises it (tests/service/test_query_route.py compares the two).
"""

import inspect
from typing import Annotated, get_args, get_origin, get_type_hints

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.params import Query
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError


def query_model(endpoint) -> type[BaseModel]:
    """M of an endpoint `(params: Annotated[M, Query()], request: Request)`; TypeError for any other signature."""
    hints = get_type_hints(endpoint, include_extras=True)
    names = list(inspect.signature(endpoint).parameters)
    first = hints.get(names[0]) if names else None
    ok = (
        len(names) == 2
        and get_origin(first) is Annotated
        and issubclass(get_args(first)[0], BaseModel)
        and any(isinstance(a, Query) for a in get_args(first)[1:])
        and hints.get(names[1]) is Request
    )
    if not ok:
        raise TypeError(f"{endpoint.__name__}: a QueryRoute endpoint takes (params: Annotated[M, Query()], request)")
    return get_args(first)[0]


def refuse_repeated(request: Request) -> None:
    """`?n=5&n=7` is ambiguous (FastAPI would take the last silently): 422 naming the parameter."""
    seen, repeated = set(), []
    for name, _ in request.query_params.multi_items():
        if name in seen and name not in repeated:
            repeated.append(name)
        seen.add(name)
    if repeated:
        raise RequestValidationError(
            [
                {"loc": ("query", name), "msg": "parameter given more than once", "type": "repeated", "input": None}
                for name in repeated
            ]
        )


def parse_query(model: type[BaseModel], request: Request) -> BaseModel:
    """The query string as `model` (which forbids unknown names); 422 (RequestValidationError) as FastAPI words it,
    and for a name given twice."""
    refuse_repeated(request)
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as e:
        raise RequestValidationError(
            [{**err, "loc": ("query", *err["loc"])} for err in e.errors(include_url=False)]
        ) from None


class QueryRoute(APIRoute):
    """Serves an endpoint `(params: Annotated[M, Query()], request)`: the route's own dependencies, each called with the
    request alone (checked here, at start-up), then the endpoint with the parsed query. App-level dependencies are
    not all passed to a route by every FastAPI version; the app's one (refusing repeated names) is in parse_query."""

    def get_route_handler(self):
        model, endpoint = query_model(self.endpoint), self.endpoint
        checks = [d.dependency for d in self.dependencies]
        for check in checks:  # a check that needs more than the request would be called wrongly: refuse it here
            try:
                inspect.signature(check).bind(None)
            except TypeError:
                raise TypeError(f"{self.path}: dependency {check.__name__} must take the request alone") from None

        async def handle(request: Request):
            for check in checks:
                await check(request)
            return await endpoint(parse_query(model, request), request)

        return handle
