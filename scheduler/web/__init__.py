"""The HTTP face of `lightbox api`: DICOMweb STOW-RS (ingest), the REST API v1 and the
dashboard, reading the database through `db/`."""
