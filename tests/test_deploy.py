"""The deployment guide's plain-host stack: the Procfile's lines under honcho with the example variables."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import redis
import requests

from schemas.events import EVENTS_STREAM, TrainFailed
from scripts import corpus, devstack
from tests.conftest import Stack
from trainer_client.client import TrainerClient

EXAMPLE = devstack.REPO_ROOT / "deploy" / "trainer.env.example"
GUIDE = devstack.REPO_ROOT / "docs" / "DEPLOY.md"
HONCHO = str(Path(sys.executable).parent / "honcho")
USER = 424242
FAILED_DM_TEXT = re.compile(r"bot\.1 +\| # Training failed")


def example_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in EXAMPLE.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name] = value
    return env


def test_the_procfile_under_honcho_serves_trains_and_notifies(stack: Stack, tmp_path: Path) -> None:
    port, flower_port, stream_port = devstack.free_port(), devstack.free_port(), devstack.free_port()
    redis_url = stack.redis_url.rsplit("/", 1)[0] + "/3"
    env = example_env()
    env.update(
        REDIS_URL=redis_url,
        PORT=str(port),
        WEB_CONCURRENCY="1",
        LIGHT_CONCURRENCY="1",
        FLOWER_PORT=str(flower_port),
        STREAM_PORT=str(stream_port),
        APP__STREAM_URL=f"http://127.0.0.1:{stream_port}",
        FLOWER_DB=str(tmp_path / "flower.db"),
        TRAINER_API_URL=f"http://127.0.0.1:{port}",
        **{name: str(tmp_path / name.split("__")[1].lower()) for name in env if name.endswith("_ROOT")},
    )
    corpus.write(Path(env["APP__CORPUS_ROOT"]) / "tiny.txt", sentences=2, seed=3)
    env_file = tmp_path / "trainer.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in env.items()))
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    output = tmp_path / "honcho.log"
    argv = [HONCHO, "start", "-f", str(devstack.REPO_ROOT / "Procfile"), "-e", str(env_file)]
    argv += ["web", "stream", "worker", "light_worker", "flower", "bot"]
    base = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with output.open("wb") as sink:
        honcho = subprocess.Popen(
            argv, cwd=tmp_path, env=base, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        api, key = f"http://127.0.0.1:{port}", {"X-Api-Key": env["SECURITY__API_KEY"]}
        devstack.wait_until(lambda: devstack.api_healthy(api), 120, "the API")
        assert requests.get(f"{api}/readyz", timeout=10).status_code == 200
        assert requests.get(f"{api}/runs?user_id=0", timeout=10).status_code == 401, "the key is required"
        token = {"Authorization": f"Bearer {env['SECURITY__METRICS_TOKEN']}"}
        assert requests.get(f"{api}/metrics", headers=token, timeout=10).status_code == 200

        flower = f"http://127.0.0.1:{flower_port}/api/workers"
        devstack.wait_until(lambda: devstack.http_answers(flower), 60, "Flower")
        assert requests.get(flower, timeout=10).status_code == 401
        user, password = env["FLOWER_BASIC_AUTH"].split(":")
        assert requests.get(flower, auth=(user, password), timeout=10).status_code == 200

        def bot_consumes() -> bool:
            try:
                groups = client.xinfo_groups(EVENTS_STREAM)
            except redis.ResponseError:
                return False
            return any(group["name"] == b"trainer-bot" for group in groups)

        devstack.wait_until(bot_consumes, 60, "the bot's consumer group")
        devstack.wait_until(lambda: output.read_text().count(" ready.") >= 2, 120, "both workers")
        body = {"corpus_path": "tiny.txt", "user_id": USER, "model_size": "tiny"}
        posted = requests.post(f"{api}/runs/train", json=body, headers=key, timeout=10)
        assert posted.status_code == 202

        def failed_dm_printed() -> bool:
            # A header line, then the text: each reaches honcho's log as it comes.
            text = output.read_text()
            return f"DM to user {USER}" in text and FAILED_DM_TEXT.search(text) is not None

        # The run fails (the corpus is too small) and the bot, without a Discord token, prints the DM.
        devstack.wait_until(failed_dm_printed, 120, "the bot's DM")

        # The API sends the run's events to the stream line, which serves them, with the same key, to the end.
        streams = f"http://127.0.0.1:{stream_port}"
        devstack.wait_until(lambda: devstack.api_healthy(streams), 60, "the stream line")
        run_id = posted.json()["run_id"]
        moved = requests.get(f"{api}/runs/{run_id}/events", headers=key, allow_redirects=False, timeout=10)
        assert (moved.status_code, moved.headers["Location"]) == (307, f"{streams}/runs/{run_id}/events")
        events = TrainerClient(api, env["SECURITY__API_KEY"]).events(run_id)
        assert isinstance(list(events)[-1].event, TrainFailed)
    finally:
        os.killpg(honcho.pid, signal.SIGTERM)
        try:
            honcho.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(honcho.pid, signal.SIGKILL)
            honcho.wait()
        client.close()


def test_the_guide_names_every_variable_the_procfile_and_the_example_use() -> None:
    guide = GUIDE.read_text()
    procfile = (devstack.REPO_ROOT / "Procfile").read_text()
    names = set(re.findall(r"\$\{(\w+)", procfile)) | set(example_env())
    names |= set(re.findall(r"^# (\w+)=", EXAMPLE.read_text(), re.MULTILINE))
    missing = sorted(name for name in names if f"`{name}`" not in guide)
    assert missing == []
