"""Required system features of a derivation, read from its .drv file.

buildbot-nix gives each nix-build the property drv_path but not the
derivation's requiredSystemFeatures. When the master can read the store
(buildbot-nix's usual layout: master and workers on one Nix host), the
.drv file says it: an environment entry ("requiredSystemFeatures","kvm
nixos-test"), or, with __structuredAttrs, a list inside the "__json" entry.
"""

import json
import re

MAX_DRV_BYTES = 16 << 20

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"'}


def _unescape(s):
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), s, flags=re.S)


def _env_value(text, name):
    m = re.search(r'\("' + re.escape(name) + r'","((?:[^"\\]|\\.)*)"\)', text, flags=re.S)
    return None if m is None else _unescape(m.group(1))


def features_from_drv_text(text):
    """The derivation's requiredSystemFeatures (sorted, deduplicated), or []."""
    value = _env_value(text, "requiredSystemFeatures")
    if value is not None:
        return sorted(set(value.split()))
    structured = _env_value(text, "__json")
    if structured is not None:
        try:
            attrs = json.loads(structured)
        except ValueError:
            return []
        feats = attrs.get("requiredSystemFeatures") if isinstance(attrs, dict) else None
        if isinstance(feats, str):
            feats = feats.split()
        if isinstance(feats, list):
            return sorted({f for f in feats if isinstance(f, str) and f})
    return []


def read_features(drv_path):
    """Features of the derivation at drv_path; raises OSError/ValueError when it cannot be read."""
    if not drv_path.endswith(".drv"):
        raise ValueError(f"{drv_path} is not a .drv path")
    # buildbot-nix passes "<drv>^*" on the command line but the property is the path.
    with open(drv_path, "rb") as f:
        raw = f.read(MAX_DRV_BYTES + 1)
    if len(raw) > MAX_DRV_BYTES:
        raise ValueError(f"{drv_path} is larger than {MAX_DRV_BYTES} bytes")
    return features_from_drv_text(raw.decode("utf-8", "replace"))
