"""``python -m rqat_deploy.cli`` is the ``rqat-deploy`` command."""

from rqat_deploy.cli import main

main()
