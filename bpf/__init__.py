"""The XDP programs' C sources and headers, installed with the package as
`nfactor_xdp.bpf` (see pyproject.toml) so that the loader finds them through
the package wherever it is installed.  Nothing to import here."""
