"""Settings: every timeout, limit and policy in one frozen pydantic-settings model.

Values come from (highest first) explicit arguments, ``QMPNET_...`` environment variables (nested with ``__``,
e.g. ``QMPNET_QMP__COMMAND_TIMEOUT=5``) and a TOML file. Nothing in the code hard-codes a timeout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from qmpnet.errors import InvalidRequest
from qmpnet.model import invalid_request_from
from qmpnet.policy import Policy

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["LaneSettings", "QmpSettings", "Settings", "load_settings"]


class QmpSettings(BaseModel):
    """Talking to one QEMU monitor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    connect_timeout: float = Field(default=5.0, gt=0, description="Seconds to connect and negotiate.")
    command_timeout: float = Field(
        default=10.0, gt=0, description="Seconds to wait for a command's answer before reporting outcome_unknown."
    )
    unplug_timeout: float = Field(
        default=10.0, ge=0, description="Default seconds remove waits for DEVICE_DELETED before removal_pending."
    )
    rollback_unplug_timeout: float = Field(
        default=5.0, ge=0, description="Seconds a rollback waits for a NIC it added to be unplugged again."
    )


class LaneSettings(BaseModel):
    """The per-guest request lane."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_waiting: int = Field(default=256, ge=1, description="Requests that may wait for a guest before 'busy'.")


class Settings(BaseSettings):
    """All of qmpnet's settings."""

    model_config = SettingsConfigDict(
        env_prefix="QMPNET_", env_nested_delimiter="__", extra="forbid", frozen=True, toml_file=None
    )

    qmp: QmpSettings = Field(default_factory=QmpSettings)
    lane: LaneSettings = Field(default_factory=LaneSettings)
    policy: Policy = Field(default_factory=Policy)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003 - no .env files
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003 - no secret dirs
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then environment, then the TOML file (when one is configured)."""
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:  # noqa: ANN401 - pydantic input
    """Load settings from ``config`` (TOML), the environment and ``overrides``.

    Raises:
        InvalidRequest: The file is missing or a value is invalid; the message names the setting.
    """
    if config is not None and not config.is_file():
        raise InvalidRequest(f"config: {config} is not a readable file", field="config")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=config)

    try:
        return Settings.model_validate(_FromFile(**overrides).model_dump())
    except ValidationError as err:
        raise invalid_request_from(err, "settings") from err
    except ValueError as err:  # TOML syntax errors
        raise InvalidRequest(f"config: {config}: {err}", field="config") from err
