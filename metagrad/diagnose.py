"""``python -m metagrad.diagnose``: the command-line form of :func:`metagrad.diagnose`.

The function lives in :mod:`metagrad.diagnosis`; this module is only the entry point,
so that ``mg.diagnose`` stays the function.
"""

from metagrad.diagnosis import main

if __name__ == "__main__":
    main()
