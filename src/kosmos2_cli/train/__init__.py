"""train layer: `kosmos2 train` (fine-tuning on grounded answers)."""
