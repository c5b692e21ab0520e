"""Stage one: teacher recipes, one per benchmark family. ``unirep`` never imports this package."""
