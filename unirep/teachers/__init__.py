"""Frozen teachers in stage two: the teacher store (folders, manifests, verification), teachers
run as one batched call, and the teacher-output cache."""
