"""The HTTP edge: the aiohttp app, handlers, access control, operator pages,
zero-copy sends."""
