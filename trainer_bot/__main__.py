"""Starts the bot: `python -m trainer_bot` (the Procfile's `bot` line)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Mapping

from trainer_bot.app import run
from trainer_bot.config import BotConfig, MissingSetting


def main(env: Mapping[str, str] | None = None) -> int:
    try:
        config = BotConfig.from_env(env)
    except MissingSetting as exc:
        print(f"trainer_bot: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(config))
    return 0


async def _serve(config: BotConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # A platform stops the bot with SIGTERM: finish the event at hand, then leave cleanly.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await run(config, stop)


if __name__ == "__main__":  # pragma: no cover - the module is run as a program, never imported
    sys.exit(main())
