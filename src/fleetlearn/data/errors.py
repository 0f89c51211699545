"""The one error type of `fleetlearn.data`."""


class DataError(ValueError):
    """Data that cannot be loaded or partitioned as configured.

    The message names the dataset or `data.*` key, the numbers involved and what to change.
    """
