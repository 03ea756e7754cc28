"""What a run is asked to be: the recipe schema and the facts it is checked against (methods, model
quirks, speed knobs, the hardware). Pure Python: nothing here imports torch."""
