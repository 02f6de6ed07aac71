"""The one exception type for user mistakes: the CLI prints it as a single line, without a traceback."""


class InputError(Exception):
    """Bad input from the user (a file, a folder, an option); the message names the file and the problem."""
