"""Lightning adapters over the pure-torch core: each picks the hook and the schedule, calls the core, and hands the
numbers to the loggers."""
