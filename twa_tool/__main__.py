"""``python -m twa_tool``: the same CLI as ``twa``."""

from .cli import main

if __name__ == "__main__":
    main()
