"""The errors distprune reports in one line with exit code 2 (bad input, not a bug).
Below every other module, so that any of them can raise one."""


class ConfigError(ValueError):
    """A setting has a value distprune cannot use."""
