"""Errors a run can end with; a UserError's message tells the user what to change."""


class UserError(Exception):
    """The request cannot be trained as given (too small a corpus, a diverging loss)."""


class RunCanceled(Exception):
    """The user asked to stop the run."""
