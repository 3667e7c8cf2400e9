"""``python -m dispatcher.api.openapi_dump [PATH]``: write the API's OpenAPI document.

The checked-in ``dispatcher/api/openapi.json`` is this output; a unit test fails when the
application's ``openapi()`` no longer matches it.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

SPEC_PATH = Path(__file__).with_name("openapi.json")


def generate() -> dict[str, Any]:
    """The document of an app built on a throwaway config (nothing in it is config-bound)."""
    from dispatcher.api.app import create_app
    from dispatcher.config import DispatcherConfig
    from dispatcher.core import Dispatcher

    with tempfile.TemporaryDirectory() as tmp:
        cfg = DispatcherConfig(path="", ca_dir=tmp, state_dir=tmp).finish()
        return create_app(Dispatcher(cfg)).openapi()


def render(spec: dict[str, Any]) -> str:
    return json.dumps(spec, indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0]) if args else SPEC_PATH
    target.write_text(render(generate()), encoding="utf-8")
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
