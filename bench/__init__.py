"""On-demand benchmarks of the driver against the sandbox (`python -m bench`, `make bench`); not part of the
pass/fail suite. See bench/__main__.py."""
