"""How aecho processes start, stop and find each other: daemon, pidfile, control, systemd."""
