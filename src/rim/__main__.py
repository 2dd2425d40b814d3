"""`python -m rim ...` (and `accelerate launch -m rim train ...`)."""

from rim.cli import main

main()
