"""`python -m nfactor_xdp.cli`: the same as `nfactorctl`."""
from . import main

main()
