"""The exception types for user mistakes: the CLI prints them as a single line, without a traceback."""


class InputError(Exception):
    """Bad input from the user (a file, a folder, an option); the message names the file and the problem."""


class TooLarge(InputError):
    """An input over the per-image pixel budget (``--max-pixels``), refused before any memory is spent on it.

    ``pixels`` is what the input would need and ``budget`` the limit it broke, so a caller can fall back (decode
    in tiles, say) instead of failing the file.
    """

    def __init__(self, message: str, pixels: int = 0, budget: int = 0):
        super().__init__(message)
        self.pixels, self.budget = pixels, budget
