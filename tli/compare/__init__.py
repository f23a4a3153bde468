"""Methods compared on one base, one corpus and one budget: ``tli compare`` (issue 13)."""
