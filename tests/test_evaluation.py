"""trainer_tasks.evaluation on a saved tiny model and saved splits; the evaluate task."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import redis
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from trainer_store.cache import FileCache
from trainer_store.jobs import JobStore, evaluation_key
from trainer_store.layout import FileStores
from trainer_store.storage import Storage
from trainer_tasks import tasks
from trainer_tasks.errors import UserError
from trainer_tasks.evaluation import EVAL_BATCH_SIZE, evaluate

VOCAB = 50
SEQ_LEN = 12
# More than one batch, the last one short: a mean of batch means would weigh its blocks wrongly.
BLOCKS = EVAL_BATCH_SIZE + 4
# Where the worker leaves them for run-1, under local artifacts and runs roots in tmp_path.
MODEL = "artifacts/models/run-1"
SPLITS = "runs/run-1/splits"


def local(root: Path) -> tuple[FileStores, FileCache]:
    files = FileStores(
        Storage(str(root / "corpora")), Storage(str(root / "artifacts")), Storage(str(root / "runs"))
    )
    return files, FileCache(root / "cache", 10**9)


def save_model(folder: Path) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=16, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    model.train(False)
    return model


def save_split(folder: Path, name: str, blocks: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(blocks, folder / f"{name}.pt")


def blocks(seed: int = 1) -> torch.Tensor:
    # Repetitive blocks early, random ones late: per-block losses differ a lot between the batches.
    generator = torch.Generator().manual_seed(seed)
    easy = torch.full((EVAL_BATCH_SIZE, SEQ_LEN), 3)
    hard = torch.randint(0, VOCAB, (BLOCKS - EVAL_BATCH_SIZE, SEQ_LEN), generator=generator)
    return torch.cat([easy, hard])


def per_block_mean(model: GPT2LMHeadModel, split: torch.Tensor) -> float:
    losses: list[float] = []
    with torch.no_grad():
        for block in split:
            loss = model(input_ids=block.unsqueeze(0), labels=block.unsqueeze(0)).loss
            assert isinstance(loss, torch.Tensor)
            losses.append(float(loss))
    return sum(losses) / len(losses)


def test_the_loss_is_the_mean_over_blocks(tmp_path: Path) -> None:
    model = save_model(tmp_path / MODEL)
    split = blocks()
    save_split(tmp_path / SPLITS, "validation", split)
    result = evaluate(*local(tmp_path), "run-1", "validation")
    expected = per_block_mean(model, split)
    assert result["split"] == "validation"
    loss = result["loss"]
    assert isinstance(loss, float)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result["batches"] == 2
    # Not the mean of the two batch means.
    with torch.no_grad():
        first = model(input_ids=split[:EVAL_BATCH_SIZE], labels=split[:EVAL_BATCH_SIZE]).loss
        second = model(input_ids=split[EVAL_BATCH_SIZE:], labels=split[EVAL_BATCH_SIZE:]).loss
    assert isinstance(first, torch.Tensor)
    assert isinstance(second, torch.Tensor)
    assert abs(loss - (float(first) + float(second)) / 2) > 0.01


def test_a_missing_split_is_the_users(tmp_path: Path) -> None:
    save_model(tmp_path / MODEL)
    save_split(tmp_path / SPLITS, "validation", blocks())
    with pytest.raises(UserError, match="the run has no test split to evaluate"):
        evaluate(*local(tmp_path), "run-1", "test")


def test_a_split_file_without_token_blocks_is_a_type_error(tmp_path: Path) -> None:
    save_model(tmp_path / MODEL)
    save_split(tmp_path / SPLITS, "test", {"not": "a tensor"})
    with pytest.raises(TypeError, match=r"test\.pt holds no token blocks"):
        evaluate(*local(tmp_path), "run-1", "test")


def test_a_model_that_returns_no_loss_is_a_type_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_model(tmp_path / MODEL)
    save_split(tmp_path / SPLITS, "validation", blocks())

    def no_loss(self: GPT2LMHeadModel, **inputs: torch.Tensor) -> CausalLMOutputWithCrossAttentions:
        return CausalLMOutputWithCrossAttentions(loss=None, logits=torch.zeros((1, SEQ_LEN, VOCAB)))

    monkeypatch.setattr(GPT2LMHeadModel, "forward", no_loss)
    with pytest.raises(TypeError, match="the model returned no loss"):
        evaluate(*local(tmp_path), "run-1", "validation")


def test_a_run_in_an_object_store_is_evaluated_from_its_cached_files(tmp_path: Path, s3_bucket: str) -> None:
    model = save_model(tmp_path / MODEL)
    split = blocks(seed=3)
    save_split(tmp_path / SPLITS, "validation", split)
    files = FileStores(Storage(f"{s3_bucket}/c"), Storage(f"{s3_bucket}/a"), Storage(f"{s3_bucket}/r"))
    files.artifacts.upload_folder(tmp_path / MODEL, "models/run-1", last="config.json")
    files.artifacts.write_bytes("models/run-1/loss_curve.png", b"not needed to evaluate")
    files.runs.upload(tmp_path / SPLITS / "validation.pt", "run-1/splits/validation.pt")
    cache = FileCache(tmp_path / "worker-cache", 10**9)
    result = evaluate(files, cache, "run-1", "validation")
    assert result["loss"] == pytest.approx(per_block_mean(model, split), rel=1e-5)
    # The model's files and the split stay cached for the next evaluation; the scratch folder is gone.
    assert len(list((tmp_path / "worker-cache" / "objects").iterdir())) == 4
    assert list((tmp_path / "worker-cache" / "work").iterdir()) == []
    with pytest.raises(UserError, match="the run has no test split"):
        evaluate(files, cache, "run-1", "test")


# The Celery task, called directly with the worker services of a monkeypatched environment.


def test_the_evaluate_task_records_the_result(worker_env: Path, redis_client: redis.Redis) -> None:
    run_dir = worker_env / "env-runs" / "run-5"
    model = save_model(worker_env / "env-artifacts" / "models" / "run-5")
    split = blocks(seed=2)
    save_split(run_dir / "splits", "test", split)
    jobs = JobStore(redis_client)
    jobs.create(evaluation_key("run-5"), {"split": "test"}, now=1.0)
    assert tasks.evaluate.run("run-5", "test") == "completed"
    record = jobs.get(evaluation_key("run-5"))
    assert record is not None
    assert record.status == "completed"
    assert record.result is not None
    assert record.result["split"] == "test"
    assert record.result["loss"] == pytest.approx(per_block_mean(model, split), rel=1e-5)


def test_the_evaluate_task_fails_a_missing_split_with_the_users_message(
    worker_env: Path, redis_client: redis.Redis
) -> None:
    save_model(worker_env / "env-artifacts" / "models" / "run-6")
    jobs = JobStore(redis_client)
    jobs.create(evaluation_key("run-6"), {"split": "test"}, now=1.0)
    assert tasks.evaluate.run("run-6", "test") == "failed"
    record = jobs.get(evaluation_key("run-6"))
    assert record is not None
    assert (record.status, record.message) == ("failed", "the run has no test split to evaluate")
    assert tasks.evaluate.run("run-unknown", "test") == "missing"
