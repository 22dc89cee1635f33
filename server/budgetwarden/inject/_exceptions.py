"""The injector's exceptions."""


class InjectError(Exception):
    """A problem that stops the webhook from starting (bad certificate, port in use); one line, for the CLI."""


class InjectConfigError(InjectError):
    """A bad flag or environment variable."""


class AnnotationError(ValueError):
    """An opted-in pod's budgetwarden.io/* annotation that cannot be honoured."""
