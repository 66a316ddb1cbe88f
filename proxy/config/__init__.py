"""config.yaml to frozen, validated objects; errors name the file, line and key path."""

from proxy.config.loader import ConfigError, config_json_schema, load_config, parse_config
from proxy.config.schema import (
    DEFAULT_UPSTREAM,
    Admin,
    Budget,
    Cache,
    ChainMember,
    Config,
    Cooldown,
    DowngradeStep,
    Ledger,
    Listen,
    Logging,
    PriceOverride,
    Pricing,
    ProxyKey,
    RateLimitPolicy,
    Retry,
    Rule,
    Upstream,
    VirtualModel,
    When,
)
from proxy.config.yamlsrc import format_path

__all__ = [
    "DEFAULT_UPSTREAM", "Admin", "Budget", "Cache", "ChainMember", "Config", "ConfigError", "Cooldown",
    "DowngradeStep", "Ledger", "Listen", "Logging", "PriceOverride", "Pricing", "ProxyKey", "RateLimitPolicy",
    "Retry", "Rule", "Upstream", "VirtualModel", "When", "config_json_schema", "format_path", "load_config",
    "parse_config",
]
