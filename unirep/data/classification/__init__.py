"""Classification data: Visual Decathlon, Hugging Face domains, the generated mini-decathlon,
transforms and normalisation statistics."""
