"""kernels subpackage (installed as rqat_deploy.kernels). Keep this file free of side effects."""
