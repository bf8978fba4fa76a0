"""Where per-message work runs when it leaves the event loop: handlers and the worker pool."""
