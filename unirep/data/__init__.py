"""Data: the Visual Decathlon reader, the embedded mini-decathlon, preprocessing and sampling."""
