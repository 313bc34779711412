"""Errors and exit codes that the command line turns into one clear line."""

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_USAGE = 2
# Preempted (SIGTERM or --preempt-signal): a checkpoint is durable; the same command resumes.
EXIT_PREEMPTED = 3


class AgreedError(Exception):
    """Raised identically on every rank (from synced values or a broadcast): rank 0 alone reports it."""

    exit_code = EXIT_CRASH
    reported = False  # already printed by rank 0


class UsageError(AgreedError):
    """Bad input from the user: one line on rank 0, exit code 2, no traceback."""

    exit_code = EXIT_USAGE


class TrainingError(AgreedError):
    """Training cannot go on (e.g. a non-finite loss): one line on rank 0, exit code 1."""


class PeerFailure(Exception):
    """Another rank failed or vanished; its own error says why."""

# What a collective raises when another rank died under it.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
