"""ctrl-exec agent: runs allowlisted scripts for trusted dispatchers over mTLS.

Imports nothing heavy at package import time; the agent depends only on the standard
library and ``cryptography``.
"""

from agent.version import __version__

__all__ = ["__version__"]
