"""``python -m twa_tool``: the same CLI as ``twa``."""

from .entry import main

if __name__ == "__main__":
    main()
