"""User-facing errors: one line, exit code 2, no traceback (see cli.main)."""


class LadderError(Exception):
    """A problem with the user's input (data, config, model name, flags).

    The message is printed as a single line; it should name the file, the line
    and the field when there is one, e.g. ``data/train.jsonl:17: field 'label' is empty``.
    """

    exit_code = 2


def where(path, line=None, field=None) -> str:
    """Format a location prefix: ``path:line: field 'f'``."""
    s = str(path)
    if line is not None:
        s += f":{line}"
    if field is not None:
        s += f": field '{field}'"
    return s
