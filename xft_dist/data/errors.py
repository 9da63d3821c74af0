"""The one exception type for bad data: the message names the file or shard, the position and what was expected."""


class DataError(ValueError):
    pass
