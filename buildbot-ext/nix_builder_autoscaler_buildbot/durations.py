"""Durations as the daemon writes them (Go syntax: "10m", "1h30m", "1.5s")."""

import re

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_duration(value):
    """Return seconds (a float) for a Go duration string or a number of seconds.

    Raises ValueError with a message that says how to write it.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration; write it like \"10m\" or \"30s\"")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{value!r}: a duration must not be negative")
        return float(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not a duration; write it like \"10m\" or \"30s\"")
    text = value.strip()
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(text):
        m = _PART.match(text, pos)
        if not m:
            raise ValueError(f"{value!r} is not a duration; write it like \"10m\", \"1h30m\" or \"30s\"")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return total


def format_duration(seconds):
    """Format seconds the way the daemon accepts them, e.g. 600 -> "10m", 2.5 -> "2.5s"."""
    seconds = float(seconds)
    if seconds < 0:
        raise ValueError("negative duration")
    if seconds != int(seconds):
        ms = round(seconds * 1000)
        if ms % 1000:
            return f"{ms}ms"
        seconds = ms / 1000
    s = int(seconds)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    out = ""
    if h:
        out += f"{h}h"
    if m:
        out += f"{m}m"
    if sec or not out:
        out += f"{sec}s"
    return out


def human(seconds):
    """A short human reading of a wait: "0.4s", "12s", "3m05s", "1h02m"."""
    seconds = max(0.0, float(seconds))
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"
