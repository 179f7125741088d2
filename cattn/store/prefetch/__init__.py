"""The prefetch lane: which disk reads to attempt under deadlines, the lane that reads them one at a
time, and partial prefetch (oldest chunk first, stopped by the job's start)."""
