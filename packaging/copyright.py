"""Writes the package's copyright file (Debian's machine-readable format 1.0, DEP-5) to
stdout: ocp-agentd under Apache-2.0, then one paragraph per Python distribution bundled
in the private environment, with the license its metadata declares and where its own
license files are.

Run with the staged environment's Python (build.sh does):
    <stage>/opt/ocp_agentd/bin/python packaging/copyright.py PREFIX [YEAR] > copyright
"""

from __future__ import annotations

import importlib.metadata
import sys
import sysconfig
from pathlib import PurePosixPath

HEADER = """\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: ocp-agentd
Comment: The daemon runs in its own Python environment under {prefix}; the
 paragraphs after the first name the Python distributions installed there.

Files: *
Copyright: {year} The ocp-agentd authors
License: Apache-2.0
"""

APACHE = """\
License: Apache-2.0
 On Debian systems, the full text of the Apache License, Version 2.0 can be
 found in /usr/share/common-licenses/Apache-2.0.
"""

# License names from package metadata, as DEP-5 short names.
SHORT_NAMES = {
    "Apache 2.0": "Apache-2.0",
    "LGPLv2+": "LGPL-2.1+",
    "PSF-2.0": "PSF-2.0",
}


def license_of(dist: importlib.metadata.Distribution) -> str:
    meta = dist.metadata
    expression = meta.get("License-Expression")
    if expression:
        return expression
    declared = (meta.get("License") or "").strip()
    if declared and "\n" not in declared and len(declared) < 40:
        return SHORT_NAMES.get(declared, declared)
    for classifier in meta.get_all("Classifier") or []:
        if classifier.startswith("License :: OSI Approved :: "):
            return classifier.rsplit(" :: ", 1)[1]
    return "unknown"


def main(prefix: str, year: str) -> str:
    site = PurePosixPath(sysconfig.get_paths()["purelib"])
    relative_site = PurePosixPath(prefix.lstrip("/")) / site.relative_to(sys.prefix)
    parts = [HEADER.format(prefix=prefix, year=year)]
    for dist in sorted(importlib.metadata.distributions(path=[str(site)]),
                       key=lambda d: d.metadata["Name"].lower()):
        name = dist.metadata["Name"]
        if name.lower().replace("_", "-") == "ocp-agentd":
            continue
        tops = sorted({PurePosixPath(str(f)).parts[0] for f in dist.files or []
                       if not str(f).startswith("..")})
        licenses = sorted(str(f) for f in dist.files or []
                          if "/licenses/" in str(f) or PurePosixPath(str(f)).name.upper()
                          .startswith(("LICENSE", "LICENCE", "COPYING")))
        holder = (dist.metadata.get("Author") or dist.metadata.get("Author-email")
                  or dist.metadata.get("Maintainer") or f"the {name} authors")
        license_name = license_of(dist)
        where = ", ".join(str(relative_site / f) for f in licenses) or "its metadata"
        parts.append(
            "Files: " + " ".join(f"{relative_site / top}" for top in tops) + "\n"
            f"Copyright: {' '.join(holder.split())}\n"
            f"License: {license_name}\n"
            f"Comment: {name} {dist.version}; the license text is in {where}.\n"
        )
    parts.append(APACHE)
    return "\n".join(parts)


if __name__ == "__main__":
    sys.stdout.write(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "2026"))
