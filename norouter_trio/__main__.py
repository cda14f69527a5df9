"""``python -m norouter_trio``: the same program as the ``norouter`` command."""

from norouter_trio.cli import main

if __name__ == "__main__":
    main()
