"""``python -m lorasoup`` (and ``accelerate launch -m lorasoup ...``) runs the CLI."""

from lorasoup.cli import main

main()
