"""`python -m grokctl.kernels.build`: compile the CPU kernels into grokctl/kernels/_build/.

Run by `make install`. A failed build is reported and exits 0: grokctl then uses its pure-JAX
path (and retries the build lazily into the user cache directory on first use).
"""

from __future__ import annotations

import subprocess
import sys

from grokctl import kernels


def main() -> int:
    existing = kernels.BUILD_DIR / kernels.library_name()
    if existing.exists():
        print(f"grokctl CPU kernels: {existing} is up to date ({kernels.info()})")
        return 0
    try:
        path = kernels.build()
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = (getattr(exc, "stderr", "") or str(exc)).strip().splitlines()
        print(
            f"grokctl CPU kernels not built ({detail[-1] if detail else exc}); "
            "the pure-JAX path will be used",
            file=sys.stderr,
        )
        return 0
    print(f"grokctl CPU kernels: {path} ({kernels.info()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
