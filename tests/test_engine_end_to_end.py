"""The training engine through real processes: upload, tokenizer task, Llama run, artifacts, evaluation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from transformers import AutoModelForCausalLM, AutoTokenizer

from scripts import corpus
from tests.conftest import Stack

SNOWFLAKE = 123456789012345678


def poll(fetch: Callable[[], dict[str, object]], timeout_s: float = 180) -> dict[str, object]:
    """The resource once its status is final."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = fetch()
        if body["status"] in ("completed", "failed", "canceled"):
            return body
        time.sleep(0.2)
    raise AssertionError(f"still {body['status']} after {timeout_s:.0f} s: {body}")


def get_json(url: str) -> dict[str, object]:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, response.text
    body: object = response.json()
    assert isinstance(body, dict)
    return {str(key): value for key, value in body.items()}


def post_json(url: str, body: dict[str, object], status: int = 202) -> dict[str, object]:
    response = requests.post(url, json=body, timeout=10)
    assert response.status_code == status, response.text
    answer: object = response.json()
    assert isinstance(answer, dict)
    return {str(key): value for key, value in answer.items()}


def test_upload_tokenize_train_evaluate_and_take_the_model_away(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = corpus.generate(1500, seed=11)
    upload = requests.post(
        f"{stack.api_url}/corpora", files={"file": ("stories.txt", text.encode(), "text/plain")}, timeout=10
    )
    assert upload.status_code == 201, upload.text
    corpus_id = upload.json()["corpus_id"]
    assert upload.json()["lines"] == text.count("\n")

    accepted = post_json(f"{stack.api_url}/tokenizers/train", {"corpus_id": corpus_id, "vocab_size": 600})
    tokenizer = poll(lambda: get_json(f"{stack.api_url}/tokenizers/{accepted['tokenizer_id']}"))
    assert tokenizer["status"] == "completed", tokenizer
    stats = tokenizer["stats"]
    assert isinstance(stats, dict)
    assert 256 < stats["vocab_size"] <= 600
    assert 0 < stats["tokens_per_char"] < 1, "BPE merges make fewer tokens than characters"
    assert 0 < stats["multibyte_coverage"] <= 1

    run = post_json(
        f"{stack.api_url}/runs/train",
        {
            "corpus_id": corpus_id,
            "tokenizer_id": accepted["tokenizer_id"],
            "model_family": "llama",
            "model_size": "tiny",
            "max_seq_len": 32,
            "batch_size": 8,
            "num_epochs": 1,
            "test_fraction": 0.1,
            "user_id": SNOWFLAKE,
        },
    )
    run_id = str(run["run_id"])
    status = poll(lambda: get_json(f"{stack.api_url}/runs/{run_id}"))
    assert status["status"] == "completed", status

    listing = get_json(f"{stack.api_url}/runs/{run_id}/artifact")
    files = listing["files"]
    assert isinstance(files, list)
    names = {entry["name"] for entry in files}
    expected = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert expected | {"manifest.json", "metrics.csv", "loss_curve.png", "logs.jsonl"} <= names
    assert not any(name.endswith(".ckpt") for name in names), "checkpoints are not artifacts"
    head = requests.get(
        f"{stack.api_url}/runs/{run_id}/artifact/loss_curve.png", headers={"Range": "bytes=0-7"}, timeout=10
    )
    assert head.status_code == 206
    assert head.content == b"\x89PNG\r\n\x1a\n"

    # The artifacts load with transformers alone, offline, and generate.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = Path(str(status["artifact_path"]))
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokens = AutoTokenizer.from_pretrained(folder)
    prompt = tokens("The old fisherman", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    decoded = tokens.decode(generated[0])
    assert isinstance(decoded, str)
    assert decoded.startswith("The old fisherman")

    for split in ("test", "validation"):
        post_json(f"{stack.api_url}/runs/{run_id}/evaluate", {"split": split})
        evaluation = poll(lambda: get_json(f"{stack.api_url}/runs/{run_id}/eval"))
        assert evaluation["status"] == "completed", evaluation
        assert evaluation["split"] == split
        loss = evaluation["loss"]
        assert isinstance(loss, float)
        assert evaluation["perplexity"] == pytest.approx(math.exp(loss))
    # Lightning averages per-batch means and the evaluation per-sample means: close, not equal.
    assert loss == pytest.approx(status["loss"], rel=0.05)
