"""The API and bot processes stay small: torch and Lightning never load there."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "lightning", "transformers")


@pytest.mark.parametrize(
    "module",
    [
        "trainer_api",
        "trainer_store.storage",
        "trainer_client.client",
        "trainer_tasks.app",
        "trainer_tasks.tasks",
        "trainer_bot",
        "trainer_bot.__main__",
        "trainer_bot.app",
    ],
)
def test_importing_a_light_process_loads_no_training_library(module: str) -> None:
    probe = (
        f"import sys, {module}\n"
        "from trainer_api import create_app\n"
        "create_app()\n"
        f"print(','.join(sorted(name for name in {HEAVY!r} if name in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_the_probe_can_see_a_heavy_import() -> None:
    probe = "import sys, trainer_tasks.training\nprint('torch' in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"
