"""The applications: the `cattn` command line, its demo, and where results go."""
