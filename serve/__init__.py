"""serve subpackage (installed as rqat_deploy.serve). Keep this file free of side effects."""
