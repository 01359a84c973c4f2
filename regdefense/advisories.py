"""Known-vulnerable versions among what a default install pulls in, checked offline against a stored list.

torchattacks (our attack source) pins ``requests~=2.25.1`` in every release up to 3.5.1, although it never imports
requests; pip has no way for a package to override another's pin, so ``pip install regdefense`` lands on requests
2.25.1 and idna 2.10, which have published advisories. The remedy is one line (below); the CLI says so when it finds
those versions, and ``python -m regdefense.advisories`` (run by CI after the remedy) exits 1 while any remain.

The list is kept by hand from the advisories' own pages (GitHub advisory database / NVD): package, the first fixed
version, the identifiers. Add a row when a dependency publishes a new one.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys

#: (distribution, first fixed version, advisories fixed by then)
ADVISORIES = (
    ("requests", "2.31.0", "CVE-2023-32681 (Proxy-Authorization leaked on redirects)"),
    ("requests", "2.32.0", "CVE-2024-35195 (verify=False kept for a session's later requests)"),
    ("requests", "2.32.4", "CVE-2024-47081 (.netrc credentials leaked to a third-party host)"),
    ("idna", "3.7", "CVE-2024-3651 (excessive CPU on crafted input to idna.encode)"),
)

REMEDY = "pip install --upgrade 'requests>=2.32.4' 'idna>=3.7'"
DETAILS = "python -m regdefense.advisories"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:4])


def findings() -> list[str]:
    """One line per installed distribution older than a fixed version on the list, naming what it is exposed to."""
    out = []
    for dist in dict.fromkeys(name for name, _, _ in ADVISORIES):
        try:
            have = md.version(dist)
        except md.PackageNotFoundError:
            continue
        open_ = [
            f"{ids} fixed in {fixed}"
            for name, fixed, ids in ADVISORIES
            if name == dist and _version(have) < _version(fixed)
        ]
        if open_:
            out.append(f"{dist} {have}: " + "; ".join(open_))
    return out


def warning() -> str | None:
    """The CLI's one short line naming the exposed packages, or None when nothing on the list is installed; the
    advisories themselves and the remedy: ``python -m regdefense.advisories``."""
    found = findings()
    if not found:
        return None
    names = " and ".join(line.split(":")[0] for line in found)  # "requests 2.25.1 and idna 2.10"
    verb = "has" if len(found) == 1 else "have"
    return f"warning: {names} {verb} published advisories; details and the one-line fix: {DETAILS}"


def main() -> int:
    found = findings()
    for line in found:
        print(line)
    print(f"{len(found)} distribution(s) with open advisories" + (f"; remedy: {REMEDY}" if found else ""))
    if found:
        print(
            "why: torchattacks (every release to 3.5.1) pins requests~=2.25.1 though it never imports requests, and "
            "pip lets no package override another's pin; pip notes that pin after the remedy, harmlessly"
        )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
