"""``netlab ui``: a local web view of running labs (figure, processes' health, traces on demand).

Layout: :mod:`netlab.web.backend` reads labs and runs traces (it is the only part that touches a
lab), :mod:`netlab.web.guard` is the request gate (Host header, token, CSRF, headers),
:mod:`netlab.web.app` the routes on Starlette, :mod:`netlab.web.page` the single page, and
:mod:`netlab.web.serve` starts uvicorn. Starlette and uvicorn are imported only by ``netlab ui``.
"""
