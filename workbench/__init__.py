"""wb, the fine-tune workbench."""

import logging

__version__ = "0.1.0"

# bitsandbytes (imported by diffusers when present) warns on CPU machines that it cannot fetch an
# optional kernel from the hub. wb never fetches anything; the warning is noise for our users.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
