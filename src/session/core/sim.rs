//! A seeded simulation of random interleavings of the session core.
