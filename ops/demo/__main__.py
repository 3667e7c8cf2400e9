"""The README's main job: ``python -m ops.demo [--loopback] [--keep]``.

Where this machine can make network and mount namespaces (root), the multi-host lab:
``docs/deploy.md`` run on eleven lab hosts with the real default paths, then real work
through the load balancers' virtual IP (:mod:`ops.demo.lab_demo`). Elsewhere, or with
``--loopback``, the same cluster on one filesystem and 127.0.0.0/8
(:mod:`ops.demo.cluster_demo`), saying why. Other options go to the demo that runs.
"""

from __future__ import annotations

import sys

from ops.lab.hosts import available


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(__doc__)
        return 0
    why = "--loopback asked for" if "--loopback" in args else available()
    args = [a for a in args if a != "--loopback"]
    if why is None:
        from ops.demo import lab_demo

        print("demo: the multi-host lab (network and mount namespaces)", flush=True)
        return lab_demo.main(args)
    from ops.demo import cluster_demo

    print(f"demo: the loopback layout on one filesystem ({why})", flush=True)
    return cluster_demo.main(args)


if __name__ == "__main__":
    sys.exit(main())
