"""The ``rqat-deploy`` command line: click commands that parse, build a config and call one library function.

``commands`` holds the click group and the commands, ``quickstart`` the offline end-to-end demo,
``inspect`` the checkpoint summary. Importing this package imports click only, so ``--help`` is instant.
"""

from rqat_deploy.cli.commands import cli, main

__all__ = ["cli", "main"]
