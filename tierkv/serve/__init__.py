"""`tierkv serve`: the OpenAI-compatible HTTP server over the tiered engine.

`engine_loop` steps the engine on its own thread while requests arrive (continuous batching across HTTP requests);
`protocol` turns OpenAI request bodies into tierkv requests and outputs into OpenAI responses, errors included;
`metrics` exports what happened in Prometheus' format; `app` is the ASGI app (FastAPI) with the routes.
"""
