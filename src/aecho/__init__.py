"""aecho: a concurrent TCP echo service, an interactive client and a verifying load tester."""

__version__ = "0.1.0"
