"""One serving process: listeners, the event loop's server, its connection protocols."""
