"""Image archives in every form: one module per form, its reader and writer side by side.

- sources.py: where an archive's members are (a tar file, an OCI layout
  directory, a stream read once) and how they are read, never extracted;
- docker_archive.py: Docker v1.2 archives, read and written;
- oci_layout.py: OCI image layouts and archives, read (written next);
- images.py: which of those an archive is, and the image a user names;
- stored_layer.py: a layer as an archive stores it, for readers and writers;
- layer_tar.py: what one layer blob holds: its digests and entries;
- documents.py, streams.py, limits.py: JSON documents, byte streams
  (slices, hashing, bounded decompression) and every bound on what is read.

Formats know nothing of the build or of the speed machinery: they write to
a `model.TarSink` and produce `model.Image`s.
"""
