"""`python -m pagedserve ...`: the `pagedserve` command line."""

from pagedserve.cli import main

main()
