"""How aecho processes start, stop and find each other: start-up order, the serving
process's signals, the supervisor of --workers, daemon, pidfile, stop/status, systemd."""
