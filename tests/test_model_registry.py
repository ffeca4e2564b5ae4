"""schemas.models.load_families: built-in families plus those installed packages register."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas import models
from schemas.models import (
    BUILTIN_FAMILIES,
    ENTRY_POINT_GROUP,
    FAMILIES,
    GPT2,
    LLAMA,
    ModelFamily,
    load_families,
)
from trainer_tasks.model import build_model

PLUGIN_MODULES = ("fake_family_plugin", "fake_family_broken")

PLUGIN = """
from schemas.models import ModelFamily, ModelShape, gpt2_params

FAMILY = ModelFamily(
    name="pico",
    sizes={"xs": ModelShape(n_layer=1, n_embd=8, n_head=1)},
    builder="trainer_tasks.model:build_gpt2",
    count_params=gpt2_params,
)
NOT_A_FAMILY = {"name": "pico2"}
"""


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A distribution installed on sys.path that registers three model family entry points."""
    (tmp_path / "fake_family_plugin.py").write_text(PLUGIN)
    (tmp_path / "fake_family_broken.py").write_text("raise RuntimeError('plugin import failed')\n")
    dist_info = tmp_path / "fake_family-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-family\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\n"
        "pico = fake_family_plugin:FAMILY\n"
        "not-a-family = fake_family_plugin:NOT_A_FAMILY\n"
        "broken = fake_family_broken:FAMILY\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in PLUGIN_MODULES:
        sys.modules.pop(name, None)


def test_without_plugins_the_builtin_families_are_registered() -> None:
    families = load_families()
    assert (families["gpt2"], families["llama"]) == (GPT2, LLAMA)
    assert tuple(FAMILIES.values())[:2] == BUILTIN_FAMILIES
    assert set(models.MODEL_FAMILIES) == set(FAMILIES)


def test_an_installed_family_is_registered_and_broken_ones_are_skipped(
    installed: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="schemas.models"):
        families = load_families()
    assert set(families) == {"gpt2", "llama", "pico"}
    assert (families["gpt2"], families["llama"]) == (GPT2, LLAMA)
    pico = families["pico"]
    assert isinstance(pico, ModelFamily)
    assert pico.builder == "trainer_tasks.model:build_gpt2"
    assert pico.count_params(pico.sizes["xs"], 100, 16) > 0
    messages = {record.getMessage(): record for record in caplog.records}
    assert set(messages) == {
        "model family entry point 'not-a-family' is not a ModelFamily; skipped",
        "model family entry point 'broken' failed to load; skipped",
    }
    broken = messages["model family entry point 'broken' failed to load; skipped"]
    assert broken.exc_info is not None
    assert isinstance(broken.exc_info[1], RuntimeError)


def test_an_installed_family_builds_in_the_worker(installed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pico = load_families()["pico"]
    monkeypatch.setitem(FAMILIES, "pico", pico)
    model = build_model("pico", "xs", vocab_size=60, max_seq_len=16)
    assert (model.config.n_layer, model.config.n_embd, model.config.n_positions) == (1, 8, 16)
