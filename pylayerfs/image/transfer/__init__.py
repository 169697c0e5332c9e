"""Images in and out: archives (``save``, ``load``) and registries (``pull``, ``push``), on one ingest path."""
