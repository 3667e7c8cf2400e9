"""The ``ctrl-exec-api`` command: :func:`dispatcher.api.daemon.main`, or one clear line
when the ``dispatcher`` extra (FastAPI, uvicorn, the etcd client) is not installed."""

from __future__ import annotations

import sys

EXTRA_MODULES = ("fastapi", "uvicorn", "pydantic", "starlette", "etcd3gw", "tenacity",
                 "prometheus_client", "requests", "httptools", "uvloop")  # fmt: skip


def main() -> int:
    try:
        from dispatcher.api.daemon import main as daemon_main
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".", 1)[0]
        if top not in EXTRA_MODULES:
            raise
        print(f"ctrl-exec-api: this needs the dispatcher extra (module '{top}' is missing): "
              "pip install 'ctrl-exec[dispatcher]'", file=sys.stderr)  # fmt: skip
        return 1
    return daemon_main()


if __name__ == "__main__":
    sys.exit(main())
