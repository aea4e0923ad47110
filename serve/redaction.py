"""What `cxr serve` does not reveal: the server's own paths in the messages it sends.

Without `--show-paths`, a message that names the index folder, the VLM folder or the upload folder names them
`<index>`, `<vlm>` and `<uploads>` instead, and any other absolute path (two parts or more) becomes `<path>`.
"""

from __future__ import annotations

import re
from pathlib import Path

_ABSOLUTE = re.compile(r"(?<![\w.:/<>-])/(?:[^\s/'\"`:,;()<>]+/)+[^\s/'\"`:,;()<>]*")


def redact_paths(text: str, named: dict[str, str | Path | None]) -> str:
    """`text` with each named folder (as given and resolved) replaced by `<label>`, then every other absolute
    path by `<path>`."""
    out = str(text)
    folders = []
    for label, folder in named.items():
        if folder:
            folders += [(str(folder), label), (str(Path(folder).resolve()), label)]
    for folder, label in sorted(folders, key=lambda x: -len(x[0])):  # longest first: a folder inside another
        if len(folder) > 1:
            out = out.replace(folder, f"<{label}>")
    return _ABSOLUTE.sub("<path>", out)
