"""clafuse: fuse trained neural-network checkpoints of different depth and width.

The package root imports nothing heavy (no torch), so that ``clafuse --help`` stays fast;
import the submodules you need, e.g. ``clafuse.api``.
"""

__version__ = "0.1.0"
