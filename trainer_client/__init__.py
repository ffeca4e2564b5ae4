"""The typed HTTP client of the trainer API and the `trainer` command, shared by the bot and users."""
