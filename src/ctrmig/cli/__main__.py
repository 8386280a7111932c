"""``python -m ctrmig.cli``: the same as the ``ctrmig`` command."""

from ctrmig.cli import main

main()
