"""The transfer job: strategies, metrics, reports and the run directory."""
