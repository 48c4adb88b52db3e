"""Ingest: DICOM arrives (SCP, STOW-RS, watched folder, pull), is checked, quarantined
or stored, and registered in the database."""
