"""The one exception type the CLI turns into a red line and exit code 2."""


class WorkbenchError(Exception):
    """Bad input or a refused operation. The message is one line naming the file, key or field."""
