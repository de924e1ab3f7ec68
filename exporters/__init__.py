"""exporters subpackage (installed as rqat_deploy.exporters). Keep this file free of side effects."""
