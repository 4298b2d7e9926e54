"""Experiment configs: one `get_config()` module each (ml_collections), e.g.
`from zf_tf.configs import default`; `--config=configs/x.py` names them from any directory.
Configs are data: they import no library code.

The helpers below word a bad setting the same way everywhere: each package checks the
config section it owns (its `check_config`, through `check_section`) and raises its own
error type with their message.
"""


def not_one_of(key: str, value, choices) -> str | None:
    """The one-line message when `value` of `key` (dotted, e.g. 'config.data.source') is not
    one of `choices`; None when it is."""
    if value in choices:
        return None
    return f"{key}={value!r} is not valid: choose one of {', '.join(choices)}"


def out_of_range(section, prefix: str, ranges) -> str | None:
    """The one-line message for the first field of `ranges` outside its range; None when
    every field is in range.

    Args:
      section: a config section (e.g. `config.train`); None or a missing field is skipped
        (configs written before the field existed).
      prefix: its name in the config, e.g. 'train'.
      ranges: (field, what it must be, test) triples, e.g.
        ("momentum", "in [0, 1)", lambda v: 0 <= v < 1).
    """
    for field, must, ok in ranges:
        value = section.get(field) if hasattr(section, "get") else None
        if value is not None and not ok(value):
            return f"config.{prefix}.{field}={value} is not valid: it must be {must}"
    return None


def check_section(section, prefix: str, error, choices=(), ranges=()) -> None:
    """Raises `error` (the calling package's error type) with the message of the first
    field of `section` (config.<prefix>) not among its choices (`not_one_of`), else outside
    its range (`out_of_range`).

    Args:
      choices: (field, valid values) pairs.
      ranges: as `out_of_range`'s.
    """
    for field, valid in choices:
        message = not_one_of(f"config.{prefix}.{field}", section[field], valid)
        if message:
            raise error(message)
    message = out_of_range(section, prefix, ranges)
    if message:
        raise error(message)
