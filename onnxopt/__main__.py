from __future__ import annotations

from .cli import main

if __name__ == "__main__":  # not when a spawned sweep worker imports the main module
    main()
