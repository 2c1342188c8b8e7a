"""Write the service's OpenAPI document: `python -m service.openapi_export` refreshes the committed docs/openapi.json.

The committed copy is what reviewers see change when the API changes; tests/service/test_openapi.py fails while it
differs from what the app serves, so run this after changing a route, a parameter or a response model (and after
merging branches that did). `-o -` prints it instead. No model is loaded: the document depends on the code only.
"""

import argparse
import json
import sys
from pathlib import Path

from service.app import create_app
from service.settings import Settings

COMMITTED = Path(__file__).resolve().parents[1] / "docs" / "openapi.json"


def openapi_document() -> dict:
    return create_app(Settings()).openapi()


def render(spec: dict) -> str:
    return json.dumps(spec, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service.openapi_export", description=__doc__.splitlines()[0])
    parser.add_argument(
        "-o", "--out", default=str(COMMITTED), help="file to write, or - for stdout (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    text = render(openapi_document())
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
