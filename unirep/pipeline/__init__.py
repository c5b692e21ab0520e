"""A whole run: the run folder, stage two (baseline, student, evaluation), results, the report,
the model card, the export, the exported student's API and the Python run API."""
