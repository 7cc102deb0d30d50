"""The demo: inputs built from images that ship in pip packages (data, docs, web), a loopback
HTTP server (server), tiny random-weight models (tiny_models), and the end-to-end run (run:
`mm1 demo`). The package itself imports nothing, so a Dask worker that unpickles a function of
one of its light modules (e.g. the server) does not import the engine with it."""
