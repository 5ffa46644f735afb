"""The one exception type users see: a bad input, reported as a single line."""


class ParetokenError(ValueError):
    """Bad user input (plan, model, data, checkpoint, storage).

    The message is one line that names the field, the bad value and the valid
    values. The CLI prints it to stderr and exits with status 2, no traceback.
    """
