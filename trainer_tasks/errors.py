"""Errors a run can end with; a UserError's message tells the user what to change."""


class UserError(Exception):
    """The request cannot be trained as given (too small a corpus, a diverging loss)."""


class TimeLimitReached(UserError):
    """The run has trained for as long as a run may (APP__MAX_RUN_S, over all its attempts)."""


class RunCanceled(Exception):
    """The user asked to stop the run."""


class LeaseLost(Exception):
    """Another executor took the run over (this one missed its heartbeats): stop and report nothing."""
