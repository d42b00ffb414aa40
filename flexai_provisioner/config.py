"""The provisioner's configuration rules, each stated once.

Every setting and its default is declared once, as a trait of
:class:`~flexai_provisioner.provisioner.FlexAIProvisioner`. :class:`SessionSettings` is the
part of them a kernel's :class:`~flexai_provisioner.session.InstanceSession` needs,
:class:`AccessSettings` what its maker needs to reach the platform (the API, the SSH key), both
read from a provisioner (the launcher makes one of its kernelspec's provisioner config, reading
no Jupyter config) or from the traits' defaults.
"""

from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

from traitlets import HasTraits

from .credentials import credentials_path
from .errors import ConfigurationError

if TYPE_CHECKING:
    from .gpu_platform import Instance
    from .provisioner import FlexAIProvisioner

MAX_GPU_COUNT = 8

# Settings that are a number of seconds (or, for workspace_max_mb, MB) and must be > 0.
_POSITIVE = (
    "provision_timeout",
    "launch_timeout",
    "ssh_connect_timeout",
    "ssh_keepalive_interval",
    "reconnect_timeout",
    "delete_timeout",
    "api_timeout",
    "workspace_max_mb",
)


def check_gpu_count(gpu_count: object) -> int:
    """Reject a GPU count that is not an integer from 1 to 8."""
    if (
        isinstance(gpu_count, bool)
        or not isinstance(gpu_count, int)
        or not 1 <= gpu_count <= MAX_GPU_COUNT
    ):
        raise ConfigurationError(
            f"invalid GPU count: gpu_count must be an integer from 1 to {MAX_GPU_COUNT}, "
            f"not {gpu_count!r}"
        )
    return gpu_count


def check_positive(name: str, value: float, unit: str = "seconds") -> None:
    """Reject a number of ``unit`` that is not finite and > 0."""
    if not (math.isfinite(value) and value > 0):
        raise ConfigurationError(f"{name} must be a number of {unit} > 0, not {value!r}")


def check_provisioner_config(provisioner: FlexAIProvisioner) -> None:
    """Refuse settings that cannot work before anything is requested, let alone billed.

    jupyter_client passes the kernelspec's provisioner config as keyword arguments, and
    traitlets ignores unknown ones (a typo like ``gpu_cuont`` would silently give one GPU),
    so the kernelspec's keys are checked here against the configurable traits.
    """
    spec = provisioner.kernel_spec.display_name
    given = provisioner.kernel_spec.metadata.get("kernel_provisioner", {}).get("config", {})
    known = sorted(provisioner.trait_names(config=True))
    unknown = sorted(set(given) - set(known))
    if unknown:
        near = difflib.get_close_matches(unknown[0], known, n=1)
        raise ConfigurationError(
            f"kernelspec {spec!r}: unknown key {unknown[0]!r} in "
            "metadata.kernel_provisioner.config"
            + (f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(known)}")
        )
    if "api_key" in given:
        raise ConfigurationError(
            f"kernelspec {spec!r} holds api_key in its kernel.json, which other users can "
            f"usually read: remove it, set FLEXAI_API_KEY or api_key in {credentials_path()} "
            "(mode 0600), and replace the key"
        )
    if not provisioner.gpu_type:
        raise ConfigurationError(
            f"kernelspec {spec!r} names no GPU type: add "
            '"gpu_type" to metadata.kernel_provisioner.config, or reinstall it with '
            "`jupyter flexai install`"
        )
    try:
        check_gpu_count(provisioner.gpu_count)
        for name in _POSITIVE:
            unit = "MB" if name == "workspace_max_mb" else "seconds"
            check_positive(name, getattr(provisioner, name), unit)
    except ConfigurationError as e:
        raise ConfigurationError(f"kernelspec {spec!r}: {e}") from None
    for name, zero in (("instance_ttl", "no expiry"), ("keep_alive", "off")):
        if getattr(provisioner, name) < 0:
            raise ConfigurationError(
                f"kernelspec {spec!r}: {name} must be >= 0 seconds (0: {zero}), "
                f"not {getattr(provisioner, name)}"
            )


def limit_reached(max_hours: float, max_cost: float, instance: Instance) -> str | None:
    """Why a kernel with these limits (0: none) may not run on ``instance`` any more, or None.
    Its hours and cost count from its creation, as its bill does: an adopted instance's
    earlier kernels and time parked count."""
    cost, hours = instance.cost(), instance.uptime() / 3600
    if max_cost and cost >= max_cost:
        return (
            f"instance {instance.id} has cost ${cost:.4f} at ${instance.price_per_hour:g}/h, "
            f"reaching the kernel's max_cost of ${max_cost:g}"
        )
    if max_hours and hours >= max_hours:
        return (
            f"instance {instance.id} has run {hours:.4f} h, reaching the kernel's max_hours of "
            f"{max_hours:g} h"
        )
    return None


_S = TypeVar("_S", bound="_Traits")


class _Traits:
    """Settings (a dataclass) read from a provisioner's traits of the same names."""

    @classmethod
    def of(cls: type[_S], configured: HasTraits) -> _S:
        """The values of a configured provisioner's traits."""
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        return cls(**{name: copy.copy(getattr(configured, name)) for name in names})

    @classmethod
    def defaults(cls: type[_S], declared: type[HasTraits], **changes: Any) -> _S:
        """The defaults of the traits ``declared`` declares, with ``changes``."""
        traits = declared.class_traits()
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        return cls(**{name: traits[name].default() for name in names} | changes)


@dataclass(frozen=True)
class AccessSettings(_Traits):
    """How a kernel reaches the platform and its instance (see the traits' help). An empty
    ``api_url`` or ``api_key`` is looked up by :func:`~.credentials.api_settings`."""

    api_url: str
    api_key: str
    api_timeout: float
    ssh_key_file: str
    ssh_key_passphrase: str
    reap_orphans_at_start: bool


@dataclass(frozen=True)
class SessionSettings(_Traits):
    """What an instance session needs of the provisioner's traits, under the same names (see
    their help)."""

    provision_timeout: float
    launch_timeout: float
    ssh_connect_timeout: float
    ssh_keepalive_interval: float
    reconnect_timeout: float
    delete_timeout: float
    instance_ttl: int
    keep_alive: int
    max_hours: float
    max_cost: float
    remote_python: str
    labels: dict[str, str]
    workspace: bool
    workspace_max_mb: float
    preload_kernel: bool
