"""What reads the frozen visual tokens: the finding head and ridge, the box head, the segment head, the detector."""
