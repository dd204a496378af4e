"""The HTTP API: protocol (request validation, errors), serving (request -> engine -> response) and app
(Starlette routes). Never imports jax directly."""
