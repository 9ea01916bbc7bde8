"""Fault campaigns: tests marked ``campaign``, run all at once by scripts/campaigns.sh."""
