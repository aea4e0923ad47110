"""The answers: the Generator and where each answer comes from, reports, drafts, DICOM SR, the hub VLMs."""
