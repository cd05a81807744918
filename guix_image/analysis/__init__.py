"""What images hold and how they differ: reading their layers, the overlay rules,
and the three reading commands' results as typed records.

- read.py: the layers of an image, read on two cores when it pays;
- overlay.py: the merged filesystem as loaders build it, and its waste;
- inspect.py, diff.py, verify.py: the results of `inspect`, `diff-layers`
  and `verify`, each a record with `to_json()`.

It reads through `formats/` and never imports the build; a rebuild to
verify against is handed in as a function.
"""
