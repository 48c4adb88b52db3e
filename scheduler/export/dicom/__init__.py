"""DICOM result objects sent back to PACS: a Structured Report with a job's findings
(:mod:`.sr`) and heatmap Secondary Captures (:mod:`.heatmap_sc`), both built with highdicom and
marked as unverified AI output."""
