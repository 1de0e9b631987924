"""The HTTP dialects the gateway speaks: one module each, holding its bodies and its thin route.

To add one, write dialects/<name>.py around a `dialect = Dialect(...)` (see ../dialect.py) and
name it in DIALECTS; create_app includes each one's router. Their order is the order of the
routes in /openapi.json and /docs.
"""

from . import cohere, nim, sglang, tei, vllm

DIALECTS = (sglang.dialect, tei.dialect, cohere.dialect, nim.dialect, vllm.dialect)
