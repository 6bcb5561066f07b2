"""Loading the Kolors models, for every notebook: ``loading.load_pipeline`` returns the
kit's ``pipeline.KitPipeline`` (the DiffSynth pipeline plus what the kit knows about
it); ``tiny`` builds the tiny Kolors-architecture files; ``random_weights`` builds
Kolors-sized random pipelines for measurements; ``rehearsal`` writes Kolors-sized
random files in the real download's layout."""
