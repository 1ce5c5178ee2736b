"""The error of the backend package, apart from the backends so that every module of the package can raise it."""

from ..errors import UserError


class BackendError(UserError, RuntimeError):
    """A backend that cannot run here, or a setting it does not support."""
