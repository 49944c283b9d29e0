"""The one exception type a user is meant to read.

Stages raise UserError for anything the user can fix (bad recipe, bad data, missing model); the CLI prints
its message as a single line and exits with code 2, without a traceback. Anything else is a bug.
"""


class UserError(Exception):
    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # always one line
