"""`kosmos2 batch --ray`: the batch of DESIGN §6 on a Ray cluster, through Ray Data (DESIGN §9).

`listing` turns the inputs into Arrow blocks of names and drops what the output file holds; `stages` is what
runs on the workers (CPU tasks prepare images, one model actor per GPU answers them); `driver` joins the
cluster, builds the pipeline and streams the records back, each once. Ray is the optional extra `ray`.
"""
