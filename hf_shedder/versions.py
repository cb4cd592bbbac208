"""The Transformers releases hf_shedder is tested on, in one place.

CI (``.ci/run`` through ``make test``) runs the whole suite on the oldest and the newest of these; the import
guard (:mod:`hf_shedder.compat`) warns when another release is installed. This file imports nothing outside
the standard library so the Makefile can read it before anything is installed:
``python3 hf_shedder/versions.py oldest`` prints ``5.17.0``.
"""

from __future__ import annotations

import sys

# Oldest and newest Transformers release the test suite runs on (bump NEWEST after CI passed on it).
TRANSFORMERS_OLDEST = "5.17.0"
TRANSFORMERS_NEWEST = "5.24.0"


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def tested_range() -> str:
    """The tested range in words, e.g. ``5.17 to 5.24``."""
    return "{}.{} to {}.{}".format(*_minor(TRANSFORMERS_OLDEST), *_minor(TRANSFORMERS_NEWEST))


def tested_requirement() -> str:
    """A pip requirement that selects a tested release, e.g. ``transformers>=5.17,<5.25``."""
    major, minor = _minor(TRANSFORMERS_NEWEST)
    return "transformers>={}.{},<{}.{}".format(*_minor(TRANSFORMERS_OLDEST), major, minor + 1)


def is_tested(version: str) -> bool:
    """Whether ``version`` belongs to a tested minor release (patch releases of a tested minor count)."""
    try:
        return _minor(TRANSFORMERS_OLDEST) <= _minor(version) <= _minor(TRANSFORMERS_NEWEST)
    except ValueError:  # an unparsable version string is not a tested one
        return False


if __name__ == "__main__":
    print({"oldest": TRANSFORMERS_OLDEST, "newest": TRANSFORMERS_NEWEST}[sys.argv[1]])
