"""Stage one: one single-task teacher per task (a Visual Decathlon domain, or a dense task),
trained when missing and cached by what determines it. Installed as ``unirep.stage_one``."""
