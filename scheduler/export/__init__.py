"""Export: DICOM SR / heatmap SC built from findings and sent to PACS destinations through
the export outbox."""
