"""The one error the launcher raises: a setting, a file or the server itself is not as needed."""


class LauncherError(RuntimeError):
    pass
