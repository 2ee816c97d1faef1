"""butlerfs: a read-only POSIX view of a Rubin Butler repository."""

__version__ = "0.1.0"
