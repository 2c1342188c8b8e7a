"""The web page (service/static/app.js, build-free) and the OpenAPI spec cannot drift apart silently: every endpoint,
query parameter and response header the page uses is read out of its source and must exist in the spec, and every
response field it reads (listed below, each with the expression the page reads it by) must be declared."""

import re

import pytest

from service.app import STATIC_DIR, create_app

APP_JS = (STATIC_DIR / "app.js").read_text()
# Headers every HTTP response may carry; the spec declares the API's own.
STANDARD_HEADERS = {"Content-Length", "Content-Type"}
# Response fields the page reads: (endpoint, path in the response schema, the expression in app.js that reads it).
# "[]" is an array's items, "*" a map's values. Reading a new field in the page means adding a row here.
FIELDS_READ = [
    ("/samplers", "[].name", "s.name"),
    ("/samplers", "[].description", "s.description"),
    ("/samplers", "[].paper", "s.paper"),
    ("/samplers", "[].steps.min", "const { min, max } = s.steps"),
    ("/samplers", "[].steps.max", "const { min, max } = s.steps"),
    ("/samplers", "[].steps.default", "s.steps.default"),
    ("/samplers", "[].tuned_timesteps", "s.tuned_timesteps"),
    ("/samplers", "[].params.*.min", "eta.min"),
    ("/samplers", "[].params.*.max", "eta.max"),
    ("/samplers", "[].params.*.description", "eta.description"),
    ("/models", "default", "listing.default"),
    ("/models", "models.[].name", "m.name"),
    ("/models", "models.[].default", "m.default"),
    ("/models", "models.[].file", "m.file"),
    ("/models", "models.[].id", "m.id.slice"),
    ("/models", "models.[].preset", "m.preset"),
    ("/models", "models.[].prediction_type", "m.prediction_type"),
    ("/models", "models.[].num_timesteps", "m.num_timesteps"),
    ("/models/{name}", "metadata.data.mean", "data.mean"),
    ("/models/{name}", "metadata.data.std", "data.std"),
    ("/models/{name}", "metadata.data.noise", "data.noise"),
    ("/field", "points", "body.points"),
    ("/field", "eps", "body.eps"),
    ("/trajectory", "ERROR.detail", "body && body.detail"),
    ("/trajectory", "ERROR.detail.[].msg", "d.msg"),
    ("/trajectory", "ERROR.detail.[].loc", "d.loc"),
]


def functions(source: str) -> dict[str, str]:
    """`function name(...) { body }` -> body, by brace matching (the page has no braces inside strings that matter)."""
    out = {}
    for m in re.finditer(r"function (\w+)\([^)]*\)\s*\{", source):
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(source[i], 0)
            i += 1
        out[m.group(1)] = source[m.end() : i - 1]
    return out


def literal_keys(text: str) -> set[str]:
    """Keys of a flat object literal's body: `n: run.n, t, ...params` -> {n, t} (spreads are followed elsewhere)."""
    keys = set()
    for item in text.split(","):
        item = item.strip()
        if item and not item.startswith("..."):
            keys.add(re.match(r"(\w+)", item).group(1))
    return keys


FUNCTIONS = functions(APP_JS)
# One API call: apiGet/getNpy("/path", query), `/path/${...}` (a path parameter), or `/path?${new URLSearchParams(q)}`
# (the <video> source). Groups: helper, path, query argument | templated path | video path, its query argument.
CALL = re.compile(
    r"(apiGet|getNpy)\(\"(/\w+)\"(?:, (\{[^{}]*\}|\w+))?"
    r"|apiGet\(`(/\w+/)\$\{"
    r"|`(/\w+)\?\$\{new URLSearchParams\((\{[^{}]*\}|\w+)\)"
)


def argument_keys(argument: str, body: str) -> set[str]:
    """The query parameters of one call's argument: a literal's keys, or for a variable the fields set on it in the
    same function (its literal, `q.x = ...`, and readQuery()'s fields when it comes from there)."""
    if not argument:
        return set()
    if argument.startswith("{"):
        return literal_keys(argument[1:-1])
    keys = set(re.findall(rf"\b{argument}\.(\w+) = ", body))
    for literal in re.findall(rf"(?:const|let) {argument} = \{{([^{{}}]*)\}}", body):
        keys |= literal_keys(literal)
    if re.search(rf"(?:const|let) {argument} = readQuery\(\)", body):
        keys |= argument_keys("q", FUNCTIONS["readQuery"])
    return keys


def calls(body: str) -> list[tuple[str, set[str]]]:
    """(path, query parameters) of every API call in a function body; a templated path ends in "{}"."""
    out = []
    for helper, path, argument, templated, video, video_argument in CALL.findall(body):
        if templated:
            out.append((templated + "{}", set()))
        elif video:
            out.append((video, argument_keys(video_argument, body)))
        else:
            keys = argument_keys(argument, body)
            if helper == "getNpy":  # getNpy adds format=npy and the dtype
                keys |= literal_keys(re.search(r"apiGet\(path, \{([^{}]*)\}", FUNCTIONS["getNpy"]).group(1))
            out.append((path, keys))
    return out


def endpoints(body: str) -> set[str]:
    return {path for path, _ in calls(body)}


def spec_path(spec: dict, path: str) -> str | None:
    """The spec's path for a called one; a templated segment matches the spec's path parameter there."""
    if not path.endswith("{}"):
        return path if path in spec["paths"] else None
    return next((p for p in spec["paths"] if re.fullmatch(re.escape(path[:-2]) + r"\{\w+\}", p)), None)


def query_params(body: str) -> set[str]:
    return set().union(*(keys for _, keys in calls(body)))


@pytest.fixture(scope="module")
def spec():
    return create_app().openapi()


def resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def declared(spec: dict, schema: dict, path: list[str]) -> bool:
    """Whether `path` (fields, "[]", "*") exists in a JSON schema, through $refs and anyOf (e.g. str | list)."""
    schema = resolve(spec, schema)
    if not path:
        return True
    if "anyOf" in schema:
        return any(declared(spec, option, path) for option in schema["anyOf"])
    head, rest = path[0], path[1:]
    if head == "[]":
        return schema.get("type") == "array" and declared(spec, schema.get("items", {}), rest)
    if head == "*":
        extra = schema.get("additionalProperties")
        return isinstance(extra, dict) and declared(spec, extra, rest)
    prop = schema.get("properties", {}).get(head)
    return prop is not None and declared(spec, prop, rest)


def test_the_page_source_is_read():
    """The extraction itself: what the page is known to call and send today (so the checks below are not vacuous)."""
    called = set().union(*(endpoints(b) for b in FUNCTIONS.values()))
    assert {"/trajectory", "/forward", "/field", "/animation", "/models", "/models/{}", "/samplers"} <= called
    assert {"model", "sampler", "n", "steps", "seed", "eta", "include_x0", "format", "dtype"} <= query_params(
        FUNCTIONS["runTrajectory"]
    )
    assert {"model", "process", "n", "steps", "seed", "fps", "size", "sampler", "spacing", "eta"} <= query_params(
        FUNCTIONS["animationUrl"]
    )


def test_every_endpoint_and_parameter_the_page_sends_is_in_the_spec(spec):
    for name, body in FUNCTIONS.items():
        for called, sent in calls(body):
            path = spec_path(spec, called)
            assert path, f"app.js {name}() calls {called}, which the spec does not have"
            params = {p["name"] for p in spec["paths"][path]["get"].get("parameters", []) if p["in"] == "query"}
            unknown = sent - params
            assert not unknown, f"app.js {name}() sends {sorted(unknown)} to {path}; the spec has {sorted(params)}"


def test_every_header_the_page_reads_is_declared(spec):
    page_paths = {spec_path(spec, p) for b in FUNCTIONS.values() for p in endpoints(b)}
    for name, body in FUNCTIONS.items():
        read = set(re.findall(r"headers\.get\(\"([\w-]+)\"\)", body)) - STANDARD_HEADERS
        # A function that calls endpoints reads their headers; a helper (describeError) those of any page endpoint.
        paths = {spec_path(spec, p) for p in endpoints(body)} or page_paths
        responses = [r for p in paths for r in spec["paths"][p]["get"]["responses"].values()]
        have = {h.lower() for r in responses for h in r.get("headers", {})}
        missing = {h for h in read if h.lower() not in have}
        assert not missing, f"app.js {name}() reads {sorted(missing)}, not declared for {sorted(paths)}"


@pytest.mark.parametrize(("path", "field", "expression"), FIELDS_READ)
def test_every_response_field_the_page_reads_is_declared(spec, path, field, expression):
    assert expression in APP_JS, f"app.js no longer reads {expression!r}: update FIELDS_READ"
    responses = spec["paths"][path]["get"]["responses"]
    parts = field.split(".")
    if parts[0] == "ERROR":  # the error body: every error of the endpoint has it
        schemas = [r["content"]["application/json"]["schema"] for s, r in responses.items() if s[0] in "45"]
        parts = parts[1:]
    else:
        schemas = [responses["200"]["content"]["application/json"]["schema"]]
    assert schemas and all(declared(spec, s, parts) for s in schemas), f"{path} does not declare {field}"
