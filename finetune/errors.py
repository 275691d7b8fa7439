"""The one exception type users see.

Every error a user can cause (a bad ref, a corrupt file, a wrong recipe key) is raised as a
`FinetuneError` whose message is a single line naming the file, key or value and what would be
right. The CLI prints it as `error: <message>` and exits with status 2 instead of a traceback.
"""


class FinetuneError(Exception):
    """A user-facing error with a one-line message."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
