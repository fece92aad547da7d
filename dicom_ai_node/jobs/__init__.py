"""Jobs: one model run on one series, from queued to delivered, resumable after a crash."""
