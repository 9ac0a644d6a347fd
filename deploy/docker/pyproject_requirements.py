"""Print the project's runtime dependencies from pyproject.toml, one per line.

The image installs these in a layer of their own, before the source is copied, so editing code
does not reinstall torch; `pip install .` afterwards installs the project from the same file.
"""

import sys
import tomllib

with open(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml", "rb") as pyproject:
    print("\n".join(tomllib.load(pyproject)["project"]["dependencies"]))
