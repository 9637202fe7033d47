"""``distributex``: run a command under a cluster lock (not built yet)."""

import sys


def main() -> int:
    print("distributex: the client is not built yet", file=sys.stderr)
    return 70


if __name__ == "__main__":
    sys.exit(main())
