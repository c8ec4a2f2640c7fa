"""One module per task kind; each exposes `run(context, model_dir)`."""
