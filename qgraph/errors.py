"""The project's exceptions. Each message is one line a user can act on: it names the
file, node, tensor or key at fault and says what to do. The CLI prints it and exits 2."""


class QGraphError(Exception):
    """Base class of every error qgraph raises on purpose."""


class ModelError(QGraphError):
    """A model file that cannot be read, checked, or written."""


class ConfigError(QGraphError):
    """A bad pipeline file, pass name or pass parameter."""


class DataError(QGraphError):
    """A data file whose keys, shapes, dtypes or values do not fit the model."""


class PassError(QGraphError):
    """A pass that cannot apply to the model it was given."""


class InterpError(QGraphError):
    """The reference interpreter met something it cannot compute exactly."""


class TrainError(QGraphError):
    """Training cannot start or resume."""
