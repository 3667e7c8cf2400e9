"""The example configurations (``ops/examples/``) name every key and load as they are."""

from __future__ import annotations

import re
from pathlib import Path

from agent.config import KNOWN_KEYS
from dispatcher.config import _FIELDS

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "ops" / "examples"


def keys_named(path: Path) -> set[str]:
    """Keys set or shown commented out (``# key = ...``), and those of a ``# a, b, c`` list."""
    text = path.read_text()
    keys = set(re.findall(r"^#?\s*([a-z_]+)\s*=", text, re.M))
    for listed in re.findall(r"^#\s+([a-z_]+(?:, [a-z_]+)+)\s*$", text, re.M):
        keys.update(listed.split(", "))
    return keys


def test_the_dispatcher_example_names_every_key() -> None:
    missing = set(_FIELDS) - keys_named(EXAMPLES / "ctrl-exec.conf")
    assert not missing, f"ops/examples/ctrl-exec.conf does not describe {sorted(missing)}"


def test_the_agent_example_names_every_key() -> None:
    missing = set(KNOWN_KEYS) - keys_named(EXAMPLES / "agent.conf")
    assert not missing, f"ops/examples/agent.conf does not describe {sorted(missing)}"


def test_the_examples_load(tmp_path: Path) -> None:
    from agent.config import load as load_agent
    from dispatcher.config import load as load_dispatcher

    assert load_dispatcher(str(EXAMPLES / "ctrl-exec.conf")).api_port == 7445
    cfg = load_agent(str(EXAMPLES / "agent.conf"))
    assert cfg.port == 7443 and "default" in cfg.profiles
