"""The README's first command: the demo launcher trains through the whole stack and narrates it."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.events import TrainCompleted, TrainFailed, TrainProgress, TrainStarted
from scripts import demo
from tests.conftest import Stack


def test_the_demo_trains_a_model_and_ends_with_its_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "demo"
    assert demo.main(["--sentences", "600", "--epochs", "1", "--workdir", str(workdir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("starting ")
    assert lines[1].startswith("submitted  run ")
    assert lines[2].startswith("started    gpt2/tiny, 1 epochs")
    assert any(line.startswith("progress   epoch 1/1") for line in lines)
    completed = next(line for line in lines if line.startswith("completed "))
    assert "validation loss" in completed
    assert "perplexity" in completed
    artifacts = Path(lines[lines.index(completed) + 1].split("artifacts: ")[1])
    assert artifacts.is_relative_to(workdir)
    assert (artifacts / "model.safetensors").is_file()
    assert lines[-1].startswith("done in ")


def test_a_demo_run_that_fails_says_why_and_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo.main(["--sentences", "3", "--workdir", str(tmp_path / "demo")]) == 1
    failed = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("failed "))
    assert "(user, failed) the corpus is too small" in failed


def test_following_a_run_gives_up_at_its_timeout(stack: Stack) -> None:
    body: dict[str, object] = {"corpus_path": "stories.txt", "user_id": 0, "model_size": "tiny"}
    with pytest.raises(TimeoutError, match="did not finish within 0 s"):
        demo.follow(stack.redis_url, body, stack.api_url, timeout_s=0.3)


def test_each_event_type_reads_as_one_line() -> None:
    started = TrainStarted(
        request_id="r",
        run_id="r",
        user_id=0,
        model_family="llama",
        model_size="small",
        total_epochs=3,
        queue="training",
        batch_size=16,
        optimal_threads=2,
    )
    assert demo.describe(started) == "started    llama/small, 3 epochs, batch 16, queue 'training', 2 threads"
    bare = TrainProgress(request_id="r", run_id="r", user_id=0, epoch=1, total_epochs=3, step=10, loss=2.5)
    assert demo.describe(bare) == "progress   epoch 1/3, step 10, loss 2.500"
    full = TrainProgress(
        request_id="r",
        run_id="r",
        user_id=0,
        epoch=2,
        total_epochs=3,
        step=20,
        loss=2.0,
        tokens_per_sec=12345.6,
        val_loss=1.9,
    )
    assert (
        demo.describe(full)
        == "progress   epoch 2/3, step 20, loss 2.000, 12,346 tokens/s, validation loss 1.900"
    )
    completed = TrainCompleted(
        request_id="r", run_id="r", user_id=0, loss=1.5, perplexity=4.4817, artifact_path="/a/b"
    )
    assert demo.describe(completed).splitlines() == [
        "completed  validation loss 1.5000, perplexity 4.482",
        "           artifacts: /a/b",
    ]
    canceled = TrainFailed(
        request_id="r", run_id="r", user_id=0, error_kind="user", message="canceled", status="canceled"
    )
    assert demo.describe(canceled) == "failed     (user, canceled) canceled"
