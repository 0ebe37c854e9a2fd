"""datasets layer: what is made of the records' boxes and scores: detection datasets (export), grounding accuracy
(eval) and the converters from public annotation files into eval's format."""
