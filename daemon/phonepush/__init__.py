"""phonepush: events in, CGI Execute pushes to Cisco IP phones out."""

__version__ = "0.1.0"

__all__ = ["__version__"]
