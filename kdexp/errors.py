"""User-facing errors: the runner prints their message without a traceback."""


class KdexpError(Exception):
    """A bad config value, missing data or an incompatible checkpoint."""


class ConfigError(KdexpError, ValueError):
    pass


class DataError(KdexpError, FileNotFoundError):
    pass
