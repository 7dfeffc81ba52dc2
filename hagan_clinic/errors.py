"""The error type the command line turns into a one-line message and exit status 2.

Kept free of heavy imports so that the CLI can name it without loading torch.
"""


class HaganError(ValueError):
    """A problem with the user's input (file, argument, config) described in one line."""
