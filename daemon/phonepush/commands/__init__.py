"""One module per CLI command; see :mod:`phonepush.cli`."""
