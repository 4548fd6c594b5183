"""The control API (aiohttp): the only package that imports aiohttp.web.

Entry points for the daemon: ``AppContext``, ``create_app``, ``start_api``, ``ApiServer``.
Handlers raise ``ApiError``; routes are declared in ``api/routes.py`` (see its docstring).
"""

from ocp_agentd.api.app import ApiServer, ApiStartError, AppContext, create_app, start_api
from ocp_agentd.api.envelope import ApiError, ErrorCode

__all__ = [
    "ApiError",
    "ApiServer",
    "ApiStartError",
    "AppContext",
    "ErrorCode",
    "create_app",
    "start_api",
]
