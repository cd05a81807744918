"""Registries: the OCI distribution protocol (`remote.py`) over HTTP (`transport.py`).

`reference.py` reads the names users give (`host[:port]/name[:tag|@digest]`);
`push.py` puts an image the readers produce into a registry, blobs first and
the manifest last, skipping the blobs the registry has.
"""
