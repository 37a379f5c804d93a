"""The one domain exception. Library code raises it; only the CLI turns it into exit codes."""


class NeurimgError(Exception):
    """A problem the user can fix (bad input, bad option, damaged file).

    `exit_code` is 2 for usage and input errors; other failures (e.g. divergence) use 1.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message
