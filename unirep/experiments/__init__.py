"""Lab tools: the step benchmark, the variants × seeds comparison and the job scheduler they use.
Nothing else in the library imports this package."""
