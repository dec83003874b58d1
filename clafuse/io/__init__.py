"""Reading and writing files: checkpoints, and atomic output so no half-written file is left behind."""
