"""The one exception type users see: a message that names the problem and the fix."""


class LeapsError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` on one line and exits 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, ``timeout``, a container's stop), raised where Ctrl-C's
    KeyboardInterrupt would be, so that everything Ctrl-C saves, SIGTERM saves too."""
