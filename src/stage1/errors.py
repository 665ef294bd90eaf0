"""Exception types, one per domain; the CLI catches :class:`Stage1Error` and prints one line."""


class Stage1Error(Exception):
    """Base class of every expected failure (bad input, bad config, missing file)."""


class ConfigError(Stage1Error):
    """A configuration file or override is invalid; the message names the key path."""


class DataValidationError(Stage1Error):
    """Input data breaks the data contract; the message names file, row and rule."""


class CheckpointError(Stage1Error):
    """A checkpoint is missing, corrupt or incompatible."""


class TrainingDivergedError(Stage1Error):
    """The training loss became NaN or infinite; the message names the global step."""
