"""Domain errors. The job layer maps InputError to exit status 2 and the rest to 1."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of a library's (often multi-line) error, for a one-line message."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class RerankError(Exception):
    """Base of every failure the pipeline reports to the user as one line."""

    exit_code = 1


class InputError(RerankError):
    """The input files, columns, values or options are wrong; the user must change them."""

    exit_code = 2


class ModelError(RerankError):
    """The model path is missing or the model is not a reranker this tool can score with."""

    exit_code = 2


class CheckpointError(RerankError):
    """A checkpoint exists but belongs to a different run (fingerprint mismatch) or is damaged."""

    exit_code = 2


class LockedError(RerankError):
    """Another live run holds the checkpoint's lease; exit 75 (EX_TEMPFAIL: try again later)."""

    exit_code = 75


class ScoringError(RerankError):
    """The GPU stage failed at run time, e.g. a single pair does not fit in memory."""

    exit_code = 1


class StoreUnavailable(RerankError):
    """The disk or object storage failed before this run scored anything; exit 1 (rerun once it is back)."""

    exit_code = 1

    @classmethod
    def before_work(cls, exc: BaseException) -> "StoreUnavailable":
        """The one message for an I/O failure before any scoring, whatever the step that met it."""
        return cls(f"{first_line(exc, 300)}; nothing was scored: check the disk, the bucket or the network, then "
                   "rerun the same command")


class Interrupted(RerankError):
    """SIGINT or SIGTERM stopped the run after the checkpoint was made consistent."""

    def __init__(self, signum: int, kept: int | None = None, total: int | None = None, redo: int | None = None,
                 requested: bool = False):
        """`kept` of `total` pairs are in the checkpoint (None: not known, e.g. planning had not
        finished); `redo` were scored by this run and not kept (None: not known). `requested`:
        the caller's `should_stop` asked for the stop, no signal (exit status as for SIGINT)."""
        where = ""
        if kept is not None and total is not None:
            where = f"; {kept:,} of {total:,} pairs are kept in the checkpoint"
            if redo is not None:
                where += f" and {redo:,} will be scored again" if redo else " and none will be scored again"
        if requested:
            super().__init__(f"stopped as should_stop asked{where}; run the same configuration again to resume")
        else:
            super().__init__(f"interrupted by signal {signum}{where}; rerun the same command to resume")
        self.exit_code = 128 + signum
