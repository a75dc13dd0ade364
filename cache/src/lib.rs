//! Content-addressed artifact store, cache keys and locks (filled in by the engine work).
