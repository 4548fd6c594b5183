"""The control API (aiohttp): the only package that imports aiohttp.web.

Entry points for the daemon: ``AppContext`` (context.py), ``create_app`` (app.py),
``start_api`` and ``ApiServer`` (listeners.py). Handlers raise ``ApiError``; routes are
declared in ``api/routes.py`` (see its docstring).
"""

from ocp_agentd.api.app import create_app
from ocp_agentd.api.context import AppContext
from ocp_agentd.api.envelope import ApiError, ErrorCode
from ocp_agentd.api.listeners import ApiServer, ApiStartError, start_api

__all__ = [
    "ApiError",
    "ApiServer",
    "ApiStartError",
    "AppContext",
    "ErrorCode",
    "create_app",
    "start_api",
]
