"""One module per stage (prepare, preprocess, train, evaluate, ensemble) and predict; none imports another.

Not empty: DVC warns about an empty dependency (every stage depends on this file) each time it hashes it."""
