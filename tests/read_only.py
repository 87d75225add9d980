"""Commands that cannot write a directory, as a container with a `:ro` volume runs them: the directory is bind-mounted
read-only in a private mount namespace of an unprivileged user namespace (``unshare``), so that the limit holds for
root too (root ignores permission bits). Writes there fail with EROFS; other processes keep their access.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

UNSHARE = ["unshare", "--user", "--map-root-user", "--mount"]


def read_only(command: list[str], *directories: Path) -> list[str]:
    """``command``, run with each of ``directories`` mounted read-only over itself."""
    mounts = " && ".join(f"mount --bind -o ro {shlex.quote(str(d))} {shlex.quote(str(d))}" for d in directories)
    return [*UNSHARE, "sh", "-c", f'{mounts} && exec "$@"', "sh", *command]


def unavailable_reason(probe_dir: Path) -> str | None:
    """Why :func:`read_only` cannot work on this machine (no ``unshare``, no unprivileged user namespaces, a mount
    that still writes), or None when it does: it mounts ``probe_dir`` read-only and tries to create a file there."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe_dir.mkdir(parents=True, exist_ok=True)
    target = probe_dir / "written"
    done = subprocess.run(
        read_only(["touch", str(target)], probe_dir), capture_output=True, text=True, timeout=30, check=False
    )
    if target.exists():
        return f"a read-only bind mount of {probe_dir} still let a process write"
    if "Read-only file system" not in done.stderr:
        return f"no read-only bind mount in a user namespace here: {done.stderr.strip()[-300:]}"
    return None
