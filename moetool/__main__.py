"""`python -m moetool` runs the command line."""

from .cli import main

main()
