"""A fake DMTCP for machines without it (fake_dmtcp.py), the stand-in header its hook build uses
(stub_header.py) and the fixture that installs them (fixtures.py); tests/contract holds it to the
real DMTCP."""
