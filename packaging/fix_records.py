"""Makes every dist-info RECORD of a staged environment true again after build.sh
edited the files (staging paths rewritten, "#!" lines dropped, shared objects stripped,
console scripts removed):

    python3 packaging/fix_records.py SITE_PACKAGES

Each line keeps its path; a file that is gone loses its line, a file that exists gets its
sha256 and size recomputed (the format of the wheel spec, PEP 376/627: urlsafe base64
without padding). Lines without a hash (RECORD itself, byte code) stay as they are.
Afterwards the RECORDs no longer carry hashes of files with the staging path in them,
which differ from one build folder to the next.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import sys
from pathlib import Path


def digest(path: Path) -> tuple[str, str]:
    data = path.read_bytes()
    encoded = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={encoded}", str(len(data))


def fix(record: Path) -> None:
    site = record.parent.parent
    rows = []
    for row in csv.reader(io.StringIO(record.read_text())):
        if not row:
            continue
        path = (site / row[0]).resolve() if not Path(row[0]).is_absolute() else Path(row[0])
        if not path.exists() and not path.is_symlink():
            continue
        if len(row) >= 3 and row[1]:
            row = [row[0], *digest(path)]
        rows.append(row)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    record.write_text(out.getvalue())


if __name__ == "__main__":
    for record in sorted(Path(sys.argv[1]).glob("*.dist-info/RECORD")):
        fix(record)
