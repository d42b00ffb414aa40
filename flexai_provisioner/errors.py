"""The one exception hierarchy of flexai-provisioner.

Every message says what happened and what the user can do about it.
"""

from __future__ import annotations


class FlexAIError(Exception):
    """Base class of every error this package raises."""


class FlexAITimeoutError(FlexAIError):
    """Something did not answer or finish in the time allowed (a timeout of any layer)."""


class ConfigurationError(FlexAIError):
    """The provisioner, kernelspec or CLI was given settings that cannot work."""


class PlatformError(FlexAIError):
    """The platform API failed or answered something that is not the API."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class PlatformUnreachableError(PlatformError):
    """The platform API could not be reached at all."""


class AuthenticationError(PlatformError):
    """The API key is missing, wrong or revoked."""


class InvalidRequestError(PlatformError):
    """The platform rejected a request as malformed."""


class UnknownGPUTypeError(PlatformError):
    """The requested GPU type is not offered by the platform."""

    def __init__(self, message: str, *, known: list[str], **kwargs: object):
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.known = known


class NoCapacityError(PlatformError):
    """The GPU type exists but none is free right now."""

    def __init__(self, message: str, *, available: list[str], **kwargs: object):
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.available = available


class NotFoundError(PlatformError):
    """The instance does not exist (or belongs to someone else)."""


class DeletionTimeoutError(PlatformError, FlexAITimeoutError):
    """The platform did not confirm a deletion in time; the instance may still be billed."""


class ProvisioningError(FlexAIError):
    """The instance did not become usable."""


class ProvisioningTimeoutError(ProvisioningError, FlexAITimeoutError):
    """The instance did not reach the running state in time."""


class StartCancelledError(ProvisioningError):
    """The kernel's start was cancelled before the kernel was ready; what it made is deleted."""


class ParkedInstanceError(ProvisioningError):
    """A parked instance (``keep_alive``) could not be adopted: gone, not running, or
    unreachable. It is deleted and a new one provisioned."""


class SSHError(FlexAIError):
    """The SSH connection to the instance failed."""


class HostKeyMismatchError(SSHError):
    """The instance presented a host key other than the one the platform reported."""


class SSHAuthenticationError(SSHError):
    """The instance refused our key."""


class SSHTimeoutError(SSHError, FlexAITimeoutError):
    """The instance's SSH server did not answer in time (handshake, login or a request)."""


class SSHChannelRefusedError(SSHError):
    """The instance refused a channel: nothing listens on a forwarded port (yet)."""


class LocalPortError(FlexAIError):
    """A local port the kernel must be reached on cannot be listened on."""


class KernelLaunchError(FlexAIError):
    """ipykernel could not be started on the instance."""


class LedgerError(FlexAIError):
    """The local ledger of instances could not be read or written."""


class WorkspaceError(FlexAIError):
    """The notebook's files could not be copied to the instance or back."""


class WorkspaceTooLargeError(WorkspaceError):
    """The notebook's folder holds more than ``workspace_max_mb`` to copy."""
