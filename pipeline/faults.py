"""Faults from the machine (a full disk, no permission, a read-only filesystem) as one line.

A write that fails anywhere (cache, ``output_dir``, Ray Train storage, a Ray worker's shard)
ends the run with ``error: cannot write <path>: <cause>`` and exit code 3 (2 is for bad input).
Errors raised in Ray workers arrive wrapped and often without their errno, so the chain is
searched first and the text second.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

from operators.errors import chain

EXIT_CODE = 3  # the machine failed the run (write fault, damaged cache, tracking store)
CAUSES = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
          errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
          errno.EPERM: "operation not permitted"}
# How the causes read in messages that lost their errno (pyarrow, safetensors' Rust, sqlite).
TEXTS = {"no space left on device": errno.ENOSPC, "storagefull": errno.ENOSPC,
         "database or disk is full": errno.ENOSPC, "disk quota exceeded": errno.EDQUOT,
         "read-only file system": errno.EROFS, "permission denied": errno.EACCES}
QUOTED_PATH = re.compile(r"""['"](/[^'"\n]+)['"]""")


class WriteFault(RuntimeError):
    """A write the machine refused; the message is the one line the user sees."""

    def __init__(self, path: Path | str | None, cause: str) -> None:
        verb = "access" if cause in ("permission denied", "operation not permitted") else "write"
        super().__init__(f"cannot {verb} {path or 'a file'}: {cause}")


def write_fault(err: BaseException, where: Path | None = None) -> WriteFault | None:
    """The write fault behind ``err``, naming its file (else ``where``); None when it is not one."""
    for seen in chain(err):
        if isinstance(seen, WriteFault):
            return seen
        if isinstance(seen, OSError) and seen.errno in CAUSES:
            return WriteFault(seen.filename or where, CAUSES[seen.errno])
    lines = [line for seen in chain(err) for line in str(seen).splitlines()]
    for needle, code in TEXTS.items():
        for line in lines:
            if needle in line.lower():  # the path, if any, is quoted on the same line
                quoted = QUOTED_PATH.search(line)
                return WriteFault(quoted.group(1) if quoted else where, CAUSES[code])
    return None
