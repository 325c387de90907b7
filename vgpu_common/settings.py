"""Settings: defaults, then a TOML file, then environment variables (the model's env_prefix),
then explicit overrides (command-line options). Validated once at start-up, so a typo stops a
daemon with a clear message instead of failing later."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class TomlSettings(BaseSettings):
    """Base of a daemon's settings; subclasses set env_prefix and extra="forbid"."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


S = TypeVar("S", bound=TomlSettings)


def load_settings(model: type[S], path: Path | None, default: Path, **overrides: Any) -> S:
    """The settings from ``path`` (must exist if given), else ``default`` if it exists;
    ``overrides`` win over everything and are validated the same way."""
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    chosen = path if path is not None else (default if default.is_file() else None)
    config = SettingsConfigDict(**{**model.model_config, "toml_file": chosen})
    from_file = type(f"{model.__name__}FromFile", (model,), {"model_config": config})
    settings: S = from_file(**overrides)
    return settings
