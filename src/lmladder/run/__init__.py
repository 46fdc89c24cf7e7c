"""One run: validate, climb the rungs in cost order, write the run folder."""
