"""butlerfs: a read-only POSIX view of a Rubin Butler repository.

``with butlerfs.mount(repo, mountpoint, collections=[...]) as m:`` mounts in the
background and unmounts when the block exits.
"""

from .errors import FsError, UsageError
from .mounting import Mount, MountOptions, mount, unmount

__all__ = ["FsError", "Mount", "MountOptions", "UsageError", "__version__", "mount", "unmount"]

__version__ = "0.1.0"
