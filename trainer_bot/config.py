"""The bot's settings, read from the environment; a missing required one stops it at once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

REQUIRED = ("TRAINER_API_URL", "REDIS_URL")
DISCORD_API_BASE = "https://discord.com/api/v10"


class MissingSetting(Exception):
    """A required environment variable is unset or empty; the message names it."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name} is required but not set (see README, section Discord bot)")
        self.name = name


@dataclass(frozen=True)
class BotConfig:
    api_url: str
    redis_url: str
    api_key: str | None = None
    discord_token: str | None = None
    # The address users can reach for download links; the API may sit on a private network.
    public_api_url: str | None = None
    # A stable name lets a restarted bot re-read the events it had not finished.
    consumer_name: str = "bot-1"
    train_cooldown_s: float = 10.0
    progress_edit_interval_s: float = 3.0
    # Another Discord API base, such as a rate-limit proxy's; the gateway URL comes from its GET /gateway.
    discord_api_base: str = DISCORD_API_BASE
    # How long the completed DM's download link works.
    link_ttl_s: int = 7 * 24 * 3600

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BotConfig:
        env = os.environ if env is None else env
        for name in REQUIRED:
            if not env.get(name):
                raise MissingSetting(name)
        defaults = cls(api_url="", redis_url="")

        def seconds(name: str, default: float) -> float:
            return float(env[name]) if env.get(name) else default

        return cls(
            api_url=env["TRAINER_API_URL"].rstrip("/"),
            redis_url=env["REDIS_URL"],
            api_key=env.get("TRAINER_API_KEY") or None,
            discord_token=env.get("DISCORD_TOKEN") or None,
            public_api_url=(env.get("PUBLIC_API_URL") or "").rstrip("/") or None,
            consumer_name=env.get("BOT_CONSUMER_NAME") or defaults.consumer_name,
            train_cooldown_s=seconds("BOT_TRAIN_COOLDOWN_S", defaults.train_cooldown_s),
            progress_edit_interval_s=seconds(
                "BOT_PROGRESS_EDIT_INTERVAL_S", defaults.progress_edit_interval_s
            ),
            discord_api_base=(env.get("DISCORD_API_BASE") or DISCORD_API_BASE).rstrip("/"),
            link_ttl_s=int(env.get("BOT_LINK_TTL_S") or defaults.link_ttl_s),
        )
