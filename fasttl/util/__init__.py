"""What every layer above the kernels shares: errors, atomic files, escaping of outputs, and the
FASTTL_* settings. Nothing here imports the rest of fasttl."""
