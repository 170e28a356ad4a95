"""Errors that end a run with `contract.EXIT_INVALID_INPUT` (permanent: retrying cannot help).

Raised by config loading, model resolution, the data preflight and a resume that finds every
checkpoint corrupt; caught once in `cli.main`.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    COMPLETED = "Completed"
    INVALID_CONFIG = "InvalidConfig"
    INVALID_DATA = "InvalidData"
    TERMINATED = "Terminated"
    ERROR = "Error"
    # A collective failed because a peer went away (closed connection, timeout): a symptom of
    # another rank's failure, which names the cause (the operator reports that one).
    PEER_LOST = "PeerLost"
    WORKER_FAILED = "WorkerFailed"  # the launcher saw a worker process die (e.g. killed)
    # Every checkpoint of the run folder fails its manifest's checksums: a retry finds the same.
    CORRUPT_CHECKPOINTS = "CorruptCheckpoints"


class InvalidInput(Exception):
    """The config or the data is wrong; the message names the field or file:line."""

    def __init__(
        self, message: str, *, reason: Reason = Reason.INVALID_CONFIG, details: list[str] | None = None
    ):
        super().__init__(message)
        self.reason = reason
        self.details = details or []

    def __str__(self) -> str:
        text = super().__str__()
        if self.details:
            text += "\n" + "\n".join(f"  {d}" for d in self.details)
        return text


class InvalidData(InvalidInput):
    def __init__(self, message: str, *, details: list[str] | None = None):
        super().__init__(message, reason=Reason.INVALID_DATA, details=details)
