"""The Discord bot: slash commands that call the API, and direct messages from run events."""
