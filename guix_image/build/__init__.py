"""The build: from a config (next: from store items) to an image archive.

- config.py: the build config, parsed and validated;
- plan.py: every layer of the image, checked before a byte is written;
- store_layer.py: a layer of store paths, scanned or replayed from the cache;
- cache.py, member_list.py: the layer cache and its member lists;
- engine.py: the build loop, streaming each layer once to a sink;
- output.py: atomic output files and signal handling;
- example.py: the example store of `build --example`.
"""
