"""User-facing errors: the runner prints their message without a traceback."""


class KdexpError(Exception):
    """A bad config value, missing data or an incompatible checkpoint."""


class ConfigError(KdexpError, ValueError):
    pass


class DataError(KdexpError, FileNotFoundError):
    pass


class DataContentError(DataError, ValueError):
    """Data that was found but cannot be used as it is: a corrupt file, labels that are not class
    ids, NaN inputs. A DataError (the data must be fixed), and a ValueError like the numpy, pickle
    and torchvision errors it replaces, so a caller that caught those (or the npz loader's former
    ConfigError, a ValueError too) still does."""


class RunInterrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM (a cluster's pre-emption) stopped a run; its run directory holds
    the last finished epoch and says status "interrupted". A BaseException, like KeyboardInterrupt,
    so that no `except Exception` swallows it."""

    def __init__(self, signum: int, run_dir: str = "", resume: str = ""):
        super().__init__(signum, run_dir, resume)
        self.signum, self.run_dir, self.resume = signum, run_dir, resume

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM

    def __str__(self) -> str:
        import signal

        name = signal.Signals(self.signum).name
        where = f"{self.run_dir} holds the last finished epoch; " if self.run_dir else ""
        return f"interrupted by {name}: {where}resume with: {self.resume}" if self.resume else f"interrupted by {name}"
