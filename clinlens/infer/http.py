"""HTTP error mapping: request problems become 4xx with a message, never a 500.

Stock MONAI Label answers an unknown model or malformed `params` JSON with a 500. The app calls
`install_error_handlers(fastapi_app)` once the server is up; Starlette builds its middleware
stack lazily, so the stack is dropped and rebuilt with these handlers on the next request.
"""
from __future__ import annotations

import json
import logging

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from clinlens.data.conventions import RequestError

logger = logging.getLogger(__name__)


def as_http(err: RequestError) -> HTTPException:
    return HTTPException(status_code=err.status, detail=str(err))


def install_error_handlers(app) -> None:
    from monailabel.interfaces.exception import (
        ImageNotFoundException,
        LabelNotFoundException,
        MONAILabelError,
        MONAILabelException,
    )

    async def bad_json(request, exc: json.JSONDecodeError):
        return JSONResponse(status_code=400, content={"detail": f"malformed JSON in form field: {exc}"})

    async def request_error(request, exc: RequestError):
        return JSONResponse(status_code=exc.status, content={"detail": str(exc)})

    async def monailabel_error(request, exc: MONAILabelException):
        if isinstance(exc, (ImageNotFoundException, LabelNotFoundException)):
            status = 404
        else:
            status = 400 if exc.error == MONAILabelError.INVALID_INPUT else 500
        return JSONResponse(status_code=status, content={"detail": exc.msg})

    from fastapi.exception_handlers import http_exception_handler
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def http_error(request, exc: StarletteHTTPException):
        # upstream answers a request with no image id with a 500; it is the caller's error
        if exc.status_code == 500 and "Neither Image nor File" in str(exc.detail):
            return JSONResponse(status_code=400, content={"detail": "no image given: pass ?image=<id> or upload a file"})
        return await http_exception_handler(request, exc)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(json.JSONDecodeError, bad_json)
    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(MONAILabelException, monailabel_error)
    app.middleware_stack = None  # rebuilt on the next request, now with these handlers
    logger.info("clinlens HTTP error handlers installed")
