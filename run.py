"""fam-bench entry point in a checkout: ``python run.py [experiment=NAME] [overrides...]``.

The same as the installed ``fam-bench`` command (:mod:`experiments.cli`).
"""

from experiments.cli import main

if __name__ == "__main__":
    main()
