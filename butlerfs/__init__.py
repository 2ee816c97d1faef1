"""butlerfs: a read-only POSIX view of a Rubin Butler repository.

``with butlerfs.mount(repo, mountpoint, collections=[...]) as m:`` mounts in the
background and unmounts when the block exits; ``butlerfs.run(repo, command, ...)`` runs
a program once per data ID, as ``butlerfs run`` does, and returns its summary.
"""

from typing import TYPE_CHECKING, Any

from .errors import FsError, UsageError
from .mounting import Mount, MountOptions, mount, unmount

if TYPE_CHECKING:
    from .runner import run

__all__ = ["FsError", "Mount", "MountOptions", "UsageError", "__version__", "mount", "run", "unmount"]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `run` comes from the wrapper package, which imports butlerfs modules itself: importing it
    # on first use keeps `import butlerfs` light and free of import cycles.
    if name == "run":
        from .runner import run

        return run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
